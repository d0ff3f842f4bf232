"""Sessions: one relay's media path through its processor, and the supervision of many."""
