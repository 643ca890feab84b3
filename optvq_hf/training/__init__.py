"""The training kit of OptVQ tokenizers, beside the model and never imported by it (nothing here is copied into a
`save_pretrained` folder):

- `losses`: `OptVQLoss` (L1, L2, LPIPS, quantizer, PatchGAN with the adaptive weight) and `OptVQLossConfig`.
- `perceptual`: LPIPS on VGG16 / AlexNet, written without torchvision.
- `discriminator`: the PatchGAN discriminator under the original's weight names.
- `data`: images from the Hub, a folder, a stream or the offline built-in sets, with resumable, process-count
  independent batches.
- `checkpointing`: atomic `checkpoint-<step>` folders.
- `codebook_init`: k-means initialisation of the codebook.
- `launch`: the multi-process guard.
- `cli`: the one configuration mechanism of every script (HfArgumentParser + YAML/JSON + sections).
"""
