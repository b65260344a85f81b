# The 13-channel "with products" GUM variant: the 10 channels plus ESA WorldCover 2020 built-up,
# GISA 2019 and WSF 2019 (GUM_REFERENCE.md).
_base_ = ["./gum_unet_psp.py"]
in_channels = 13
model = dict(backbone=dict(in_channels=in_channels))
