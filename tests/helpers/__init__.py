"""What the tests share that is neither a fixture nor a mount: the C library calls
(libc) and the one tree snapshot (snapshot)."""
