"""One module per sample image: each a short recipe over vmcraft_tasks.samples.toolkit.

A recipe's public function returns the cached image (building it on first use); the
registry of every sample is `vmcraft_tasks.samples.SAMPLES`.
"""
