# The GlobalUrbanMapper network (GUM_REFERENCE.md "The network"): mmsegmentation EncoderDecoder,
# UNet backbone (5 stages, 64 base channels) + PSP head, 2 classes (1 = urban), 10 input channels.
norm_cfg = dict(type="BN", requires_grad=True)
in_channels = 10
base_channels = 64
model = dict(
    type="EncoderDecoder",
    pretrained=None,
    backbone=dict(
        type="UNet",
        in_channels=in_channels,
        base_channels=base_channels,
        num_stages=5,
        strides=(1, 1, 1, 1, 1),
        enc_num_convs=(2, 2, 2, 2, 2),
        dec_num_convs=(2, 2, 2, 2),
        downsamples=(True, True, True, True),
        enc_dilations=(1, 1, 1, 1, 1),
        dec_dilations=(1, 1, 1, 1),
        with_cp=False,
        conv_cfg=None,
        norm_cfg=norm_cfg,
        act_cfg=dict(type="ReLU"),
        upsample_cfg=dict(type="InterpConv"),
        norm_eval=False,
    ),
    decode_head=dict(
        type="PSPHead",
        in_channels=base_channels,
        in_index=4,
        channels=16,
        pool_scales=(1, 2, 3, 6),
        dropout_ratio=0.1,
        num_classes=2,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=None,
    train_cfg=dict(),
    test_cfg=dict(mode="slide", crop_size=(256, 256), stride=(256, 256)),
)
