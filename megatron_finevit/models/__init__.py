"""Model code: FineViT encoder, attention, text tower, LLM, heads, VLM, teacher, layer specs."""
