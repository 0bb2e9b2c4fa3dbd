"""Developer tools of a source checkout (not installed): the GPU validation suite
(gpu_suite.sh / gpu_suite.py), the sm_90 compile check of the Triton kernels
(compile_check.py) and the generator of docs/knobs.md (knobs.py)."""
