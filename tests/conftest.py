import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def tiny_unet(seed: int = 0) -> UNet2DModel:
    """A seeded two-block UNet2DModel (the diffusers-tests habit): fast and exact."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)


@pytest.fixture
def tiny_unet_dir(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "tiny" / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "tiny" / "scheduler")
    return tmp_path / "tiny"
