"""Built-in models: SD 1.x topology, layer identity, and loading errors."""
import pytest
import torch

from neti_fast.errors import NetiError
from neti_fast.sd.families import SD1
from neti_fast.sd.models import UNET_LAYERS, cross_attention_modules, load_model, sd15_configs, tiny_configs

# SD 1.5 cross-attention widths in execution order (IN01 .. OUT11); 8 heads everywhere.
SD15_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]


def _unet(cfg):
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):  # structure only: no memory, no init cost
        return UNet2DConditionModel(**cfg["unet"])


def test_sd15_shaped_topology():
    mods, layers = cross_attention_modules(_unet(sd15_configs()), SD1)
    assert layers == list(range(16))
    assert [m.to_q.out_features for m in mods] == SD15_WIDTHS
    assert all(m.heads == 8 and m.to_k.in_features == 768 for m in mods)
    assert sd15_configs()["text"]["hidden_size"] == 768 and sd15_configs()["text"]["max_position_embeddings"] == 77


def test_tiny_has_the_same_layer_structure(tiny_model):
    mods = tiny_model.cross_attention
    assert len(mods) == len(UNET_LAYERS) == 16
    assert UNET_LAYERS[:7] == ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID") and UNET_LAYERS[-1] == "OUT11"
    # widths follow SD 1.5's pattern scaled down: down 2+2+2, mid, up 3+3+3
    widths = [m.to_q.out_features for m in mods]
    tiny_unet = tiny_configs(100, 0, 1)["unet"]["block_out_channels"]
    scale = {320: tiny_unet[0], 640: tiny_unet[1], 1280: tiny_unet[2]}
    assert widths == [scale[w] for w in SD15_WIDTHS]
    assert tiny_model.text_encoder.config.max_position_embeddings == 77
    assert tiny_model.scheduler_config["beta_schedule"] == "scaled_linear"


def test_processors_are_bound_once_with_their_layer(tiny_model):
    from neti_fast.sd.attention import install_processors
    state = install_processors(tiny_model)
    assert install_processors(tiny_model) is state
    assert [m.processor.layer for m in tiny_model.cross_attention] == list(range(16))


def test_tokenizer_is_real_bpe(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok("a photo of a dog", add_special_tokens=False).input_ids
    assert len(ids) == 5  # every common word is one token
    assert len(tok("zyxwvq", add_special_tokens=False).input_ids) > 1  # unknown words split into pieces
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[0] == tok.bos_token_id and padded[-1] == tok.eos_token_id


def test_bad_model_spec(tmp_path):
    with pytest.raises(NetiError, match="missing"):
        load_model(str(tmp_path))
    with pytest.raises(NetiError, match="no such local folder"):
        load_model("./does/not/exist")


def test_load_in_dtype_directly():
    """from_pretrained(..., torch_dtype=...) loads every component in the dtype asked for."""
    m = load_model("tiny", dtype=torch.bfloat16)
    assert {m.unet.dtype, m.text_encoder.dtype, m.vae.dtype} == {torch.bfloat16}
