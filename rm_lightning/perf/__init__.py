"""Performance machinery: how a batch goes through the decoder (packed pairs, padded), FlexAttention,
activation checkpointing, optimizer steps in backward, compiled layers, FSDP2 sharding and the CPU
allocator setting. None of it changes what is computed, only how fast and in how much memory."""
