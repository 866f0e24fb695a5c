"""Triton kernels for populations of networks (`fastpop.kernels.triton`).

One file per fused operation, each with its private `_name_*_kernel` functions first and its launchers after.
The kernels know nothing of nn.Module, autograd, files or the CLI; `fastpop.ops.triton` wraps them in
autograd functions with the signatures of `fastpop.ops.reference`.
"""
