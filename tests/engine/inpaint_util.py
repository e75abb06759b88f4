"""The inpainting reference the engine tests hold neti-fast to, on every family: diffusers' own
img2img pipeline with StableDiffusionInpaintPipeline's rule for 4-channel U-Nets done in its step
callback. After every step the unmasked latents are the init latents noised to the next timestep
(clean after the last), the init latent and the noise drawn from the seed exactly as the pipeline
draws them (the VAE sample, then the noise)."""
import numpy as np
import torch
from PIL import Image

from neti_fast.engine.img2img import latent_mask, prepare_init, schedule_start

STRENGTH = 0.6


def masked_init(init_image):
    """(neti-fast's Init, the pixel mask as bool) of a two-rectangle mask over `init_image`."""
    size = init_image.height
    m = np.zeros((size, size), np.uint8)
    m[:, :32] = 255
    m[40:] = 255
    init = prepare_init(init_image, size, size, STRENGTH, mask=Image.fromarray(m), mask_blur=(0, 0), fill=1)
    return init, m > 0


def blended_reference(pipe, prompt, init_image, init, steps: int, seed: int, **pipe_kw) -> np.ndarray:
    """The pipeline's image (uint8) for `prompt` with the blend of `init`'s mask in its step callback."""
    f = pipe.vae_scale_factor
    keep = 1 - torch.from_numpy(latent_mask(init.mask, init_image.height // f, init_image.width // f))[None, None]
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.from_numpy(np.asarray(init_image).copy()).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    init_lat = pipe.vae.encode(x).latent_dist.sample(g) * pipe.vae.config.scaling_factor
    noise = torch.randn(init_lat.shape, generator=g)

    def blend(p, i, t, kw):
        ts = p.scheduler.timesteps[schedule_start(steps, STRENGTH):]
        proper = init_lat if i == len(ts) - 1 else p.scheduler.add_noise(init_lat, noise, ts[i + 1:i + 2])
        return {"latents": keep * proper + (1 - keep) * kw["latents"]}
    out = pipe(prompt, image=init_image, strength=STRENGTH, num_inference_steps=steps, callback_on_step_end=blend,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **pipe_kw).images[0]
    return (out * 255).round().astype("uint8")
