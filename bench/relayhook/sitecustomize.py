"""On the PYTHONPATH of a `serve` subprocess (bench.relays.ServedRelay) only: Python imports
sitecustomize at start-up, in the front and in every worker it starts (they inherit the
environment), so that their threads are named as an in-process relay's are (bench.threadnames)
and the CPU breakdown groups them by kind alike."""

from bench.threadnames import named_threads

# Kept for the process's life: a context manager collected would exit, undoing the naming.
NAMING = named_threads()
NAMING.__enter__()
