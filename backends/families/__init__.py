"""Checkpoint families other than Llama's layout: each module translates one Hugging Face family's config.json
keys and tensor names (fused projections, transposed Conv1D) into the reference model's (backends/checkpoint.py
calls them on load); what a family's config asks for that the model does not implement is refused in one line."""
