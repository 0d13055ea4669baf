"""Planning: what a model costs per micro-batch (FLOPs per module; ``flops``) — the one source for
the trainer's MFU and the planning tools."""
