"""MoCHA vision-language models: encoders, MoE connectors, Hierarchical Group Attention, decoder
LM, the embedded digit-VQA task and its train / eval steps."""
