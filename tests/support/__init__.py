"""Helpers of the test suite, in one place (imported as `from support import conformance`):

conformance        the shared checks every backend runs (official cases, op level, statistics, opcheck)
reference_data     the official fixtures of tests/data and the weight recipe
fixture_container  the lossless container format of those fixtures
grad_errors        one error statistic for whole-model gradients (ours and PyTorch's)
fused_route        "auto" through the custom ops on CPU tensors (compiled kernels or a stand-in)
isolated           run a call in a forked process and report how it ended (crash, hang, exception)
hostile_calls      the hostile-call corpus assembled from tests/hostile/
triton_aot_checks  "auto" on fake GPUs of each arch (run as a script with TRITON_INTERPRET=0)
module_copies      a module deep-copied and pickled, as users copy models
"""
