"""The bidirectional Transformer: its frozen config, choice tables and parameter groups
(config.py), layers and attention implementations (layers.py), the stack, remat and loss head
(transformer.py). Imports only parallel/ and below."""
