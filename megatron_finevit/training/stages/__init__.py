"""FineViT's training stages as trainer plug-ins (``training/stage.py``): Stage I masked image
modelling (``mim``) and Stage II contrastive learning (``contrastive``)."""
