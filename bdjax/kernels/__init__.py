"""C++ kernels for XLA:CPU, compiled on first use (see `build`)."""
