"""FineViT's training stages as trainer plug-ins (``training/stage.py``): Stage I masked image
modelling (``mim``), Stage II contrastive learning (``contrastive``) and Stage III LLM alignment on
region QA (``align``)."""
