"""The batch augmentations against torchvision's own functional transforms on the same parameters.

torchvision (`transforms.v2.functional`) is the reference the papers' code uses, image by image;
ours draws the parameters per sample and applies them to the whole batch at once.
"""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ssl_tune.data import augment
from ssl_tune.data.augment import ViewAugmentation


def images(n=6, channels=3, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Smooth images (upsampled noise) in (0.1, 0.9): nothing clips in the colour operations below.
    small = torch.rand(n, channels, size // 4, size // 4, generator=g)
    return 0.1 + 0.8 * torch.nn.functional.interpolate(small, size=size, mode="bilinear", align_corners=False)


FACTORS = torch.tensor([0.6, 0.8, 1.0, 1.1, 1.25, 1.4])


@pytest.mark.parametrize("ours, theirs", [
    (augment.adjust_brightness, TF.adjust_brightness),
    (augment.adjust_contrast, TF.adjust_contrast),
    (augment.adjust_saturation, TF.adjust_saturation),
])
def test_colour_operations_match_torchvision_per_sample(ours, theirs):
    x = images()
    out = ours(x, FACTORS)
    for i, factor in enumerate(FACTORS.tolist()):
        expected = theirs(x[i], factor)
        # torchvision clamps after each step; these images stay inside [0, 1], so nothing is cut.
        torch.testing.assert_close(out[i].clamp(0, 1), expected, rtol=0, atol=2e-4)  # grey weights 0.299 vs 0.2989


def test_grayscale_and_solarize_match_torchvision():
    x = images()
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(augment._grayscale(x, 1.0, g), TF.rgb_to_grayscale(x, num_output_channels=3),
                               rtol=0, atol=2e-4)
    torch.testing.assert_close(augment._solarize(x, 1.0, g), TF.solarize(x, threshold=0.5))


def test_hue_rotation_stays_close_to_torchvision_hsv_shift():
    """Hue is shifted by rotating the chroma plane in YIQ (one matrix product per sample) instead of
    an HSV round trip, and an angle turns the colour wheel the other way than torchvision's factor
    of the same sign. The jitter draws the shift uniformly in [-hue, hue], so the distribution of
    views is the same; per image, lightness and saturation are kept only approximately (measured:
    0.03 and 0.055 mean absolute error at shifts of 0.05 and 0.1 turn, against 0.07 and 0.13 with
    the sign as torchvision has it)."""
    x = images()
    shifts = torch.tensor([-0.1, -0.05, 0.0, 0.02, 0.05, 0.1])
    out = augment._rotate_hue(x, -shifts * 2 * math.pi).clamp(0, 1)
    errors = torch.stack([(out[i] - TF.adjust_hue(x[i], s)).abs().mean() for i, s in enumerate(shifts.tolist())])
    assert errors[2] < 1e-6  # no shift: the image itself
    assert errors.max() < 0.07, errors  # mean absolute error per pixel, on a 0-1 scale


def test_blur_matches_torchvision_gaussian_blur():
    x = images(size=32)
    aug = ViewAugmentation(blur_p=1.0, blur_sigma=(1.5 / 32, 1.5 / 32))  # sigma 1.5 px for every sample
    out = augment._blur(x, aug, torch.Generator().manual_seed(0))
    radius = max(1, int(32 * 0.05))
    expected = TF.gaussian_blur(x, kernel_size=[2 * radius + 1] * 2, sigma=[1.5, 1.5])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_resized_crop_and_flip_match_torchvision_inside_the_crop():
    """The crop is sampled on a continuous grid: for a box on whole pixels it is torchvision's
    crop + bilinear resize (antialias off); only the outermost output pixels differ, where
    torchvision clamps to the box's edge and the grid reads the pixel beyond it."""
    x = images(n=1, size=32)
    top, left, height, width = 4, 6, 20, 16
    theta_w, theta_h = width / 32, height / 32
    cx, cy = (2 * left + width) / 32 - 1, (2 * top + height) / 32 - 1
    for flip in (1.0, -1.0):
        ours = augment.crop_and_flip(x, *(torch.tensor([v]) for v in (theta_w, theta_h, cx, cy, flip)))
        theirs = TF.resized_crop(x, top, left, height, width, [32, 32], antialias=False)
        if flip < 0:
            theirs = TF.horizontal_flip(theirs)
        torch.testing.assert_close(ours[..., 2:-2, 2:-2], theirs[..., 2:-2, 2:-2], rtol=0, atol=1e-5)
