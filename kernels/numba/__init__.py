"""numba kernels of the numba backend (`fastpop.ops.numba_cpu`): whole networks per core."""
