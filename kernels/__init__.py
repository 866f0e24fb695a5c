"""The kernels of fastpop's backends (`fastpop.kernels`): kernels/<backend>/ holds each backend's kernels and
nothing else (`kernels/triton/`, `kernels/numba/`); their thin wrappers are `fastpop.ops.<backend>`."""
