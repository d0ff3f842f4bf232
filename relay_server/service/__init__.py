"""The gRPC service: RelayService over a SessionManager, with health, reflection and operations."""
