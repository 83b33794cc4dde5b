"""``raytp bench``: a load generator for any OpenAI-compatible endpoint (flags and metric names follow
``vllm bench serve``), with ``--compare`` across endpoints / raytp configurations / an in-process
transformers baseline in one run, and a memory-bandwidth roofline of single-stream decode."""
