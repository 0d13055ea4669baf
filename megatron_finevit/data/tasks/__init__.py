"""Stage III / SFT data tasks: region QA (bbox↔caption, bbox↔OCR, global caption), box
serialisation, the Qwen3 chat rendering and multimodal packing."""
