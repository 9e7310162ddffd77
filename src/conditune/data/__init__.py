"""Speech data: audio loading, JSONL manifests, Hugging Face datasets, synthetic speech, batching."""
