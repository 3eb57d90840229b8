"""The network and its hand-over: backbones, heads and the fine-tuning schedule, the model bundle
(weights + schema-checked manifest), and Grad-CAM explanations of what a bundle looked at."""
