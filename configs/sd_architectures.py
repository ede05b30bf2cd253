"""The published Stable Diffusion checkpoints' component configs, as their config.json files say.

Used for the configs' defaults and for counting parameters at full size without a download
(tests/test_param_counts.py). A run with `model.pretrained` set takes the architecture from the
folder itself; these tables never override a folder.
"""
_SD_UNET_COMMON = {
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
}

_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}

_CLIP_L = {  # OpenAI CLIP ViT-L/14 text tower (SD 1.x, SDXL's first encoder)
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2,
    "pad_token_id": 1,
}

_SCALED_LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}

SD15 = {
    "model_id": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "unet": {**_SD_UNET_COMMON, "sample_size": 64, "cross_attention_dim": 768,
             "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
    "vae": _VAE,
    "text_encoders": [("CLIPTextModel", _CLIP_L)],
    "scheduler": _SCALED_LINEAR,
}

SD21 = {
    "model_id": "stabilityai/stable-diffusion-2-1",
    "unet": {**SD15["unet"], "sample_size": 96, "cross_attention_dim": 1024,
             "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
             "upcast_attention": True},
    "vae": {**_VAE, "sample_size": 768},
    "text_encoders": [("CLIPTextModel", {  # OpenCLIP ViT-H/14 text tower, last layer dropped
        **_CLIP_L, "hidden_size": 1024, "intermediate_size": 4096, "projection_dim": 512,
        "num_hidden_layers": 23, "num_attention_heads": 16, "hidden_act": "gelu"})],
    "scheduler": {**_SCALED_LINEAR, "prediction_type": "v_prediction"},
}

SDXL = {
    "model_id": "stabilityai/stable-diffusion-xl-base-1.0",
    "unet": {**_SD_UNET_COMMON, "sample_size": 128, "cross_attention_dim": 2048,
             "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816},
    "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    "text_encoders": [
        ("CLIPTextModel", _CLIP_L),
        ("CLIPTextModelWithProjection", {  # OpenCLIP ViT-bigG/14 text tower
            **_CLIP_L, "hidden_size": 1280, "intermediate_size": 5120, "projection_dim": 1280,
            "num_hidden_layers": 32, "num_attention_heads": 20, "hidden_act": "gelu"}),
    ],
    "scheduler": _SCALED_LINEAR,
}

ARCHITECTURES = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}
