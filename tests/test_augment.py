"""The batch augmentations against torchvision's own functional transforms on the same parameters.

torchvision (`transforms.v2.functional`) is the reference the papers' code uses, image by image;
ours draws the parameters per sample and applies them to the whole batch at once.
"""

import math
import re

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


# --- searchable strengths (data.augmentation) ---------------------------------------------------


def _augmentation(**fields):
    from ssl_tune.spec import AugmentationSpec

    return AugmentationSpec(**fields)


@pytest.mark.parametrize("preset", ["byol", "symmetric", "weak"])
def test_a_spec_without_strengths_gives_its_presets_views(preset):
    spec_views = augment.spec_views(_augmentation(preset=preset, crop_min_scale=0.5), num_views=3)
    assert spec_views == augment.preset_views(preset, (0.5, 1.0), num_views=3)


def test_strengths_replace_the_presets_values_per_view_and_never_touch_the_weak_view():
    aug = _augmentation(crop_min_scale=0.3, jitter_strength=0.5, jitter_p=0.3, grayscale_p=0.0, blur_sigma=(0.01, 0.02),
                        view1={"blur_p": 0.2}, view2={"solarize_p": 0.7})
    first, second, third = augment.spec_views(aug, num_views=3)
    assert (first.brightness, first.contrast, first.saturation, first.hue) == (0.2, 0.2, 0.1, 0.05)
    assert (first.jitter_p, first.grayscale_p, first.crop_scale, first.blur_sigma) == (0.3, 0.0, (0.3, 1.0), (0.01, 0.02))
    assert (first.blur_p, first.solarize_p) == (0.2, 0.0)  # solarize: byol's for view 1
    assert (second.blur_p, second.solarize_p) == (0.1, 0.7) and third == second  # further views follow view 2
    weak = augment.spec_views(aug, weak=True)[1]
    assert weak == augment.preset_views("weak", (0.3, 1.0))[1] and weak.jitter_p == 0.0


def test_the_augmented_views_change_as_the_strength_changes():
    x = (images(n=64) * 255).to(torch.uint8)

    def change(**fields):  # mean absolute change of the pixels, with crop and flip held still
        view = augment.spec_views(_augmentation(crop_min_scale=1.0, **fields))[1]
        view = ViewAugmentation(**{**view.__dict__, "crop_ratio": (1, 1), "flip_p": 0.0})
        return (augment.augment_batch(x, view, torch.Generator().manual_seed(0)) - x.float() / 255).abs().mean().item()

    quiet = dict(jitter_p=1.0, grayscale_p=0.0, view2={"blur_p": 0.0, "solarize_p": 0.0})
    jitter = [change(jitter_strength=s, **quiet) for s in (0.0, 0.5, 1.0, 2.0)]
    assert jitter[0] < 1e-6 and jitter[0] < jitter[1] < jitter[2] < jitter[3]
    solarize = [change(jitter_strength=0.0, **{**quiet, "view2": {"blur_p": 0.0, "solarize_p": p}}) for p in (0.0, 0.5, 1.0)]
    assert solarize[0] < 1e-6 < solarize[1] < solarize[2]
    gray = [change(jitter_strength=0.0, **{**quiet, "grayscale_p": p}) for p in (0.0, 1.0)]
    assert gray[0] < 1e-6 < gray[1]


def test_augmentation_ranges_are_sampled_and_bad_values_name_the_field():
    import optuna

    from ssl_tune.searching.space import SearchSpace, field_values
    from ssl_tune.spec import SpecError
    from ssl_tune.spec.files import spec_from_dict
    from tests.conftest import tiny_spec_dict

    raw = tiny_spec_dict()
    raw["data"] = {"augmentation": {"crop_min_scale": {"type": "uniform", "low": 0.08, "high": 0.6},
                                   "jitter_strength": {"type": "uniform", "low": 0.0, "high": 1.5},
                                   "view2": {"solarize_p": {"type": "uniform", "low": 0.0, "high": 0.5}}}}
    spec = spec_from_dict(raw)
    paths = {"data.augmentation.crop_min_scale", "data.augmentation.jitter_strength", "data.augmentation.view2.solarize_p"}
    assert set(spec.search_ranges()) == paths
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        SearchSpace(spec)(trial)
        a = spec.resolve(field_values(trial.params)).data.augmentation
        view = augment.spec_views(a)[1]
        assert 0.08 <= view.crop_scale[0] <= 0.6 and view.brightness == pytest.approx(0.4 * a.jitter_strength)
        assert view.solarize_p == a.view2.solarize_p <= 0.5
    for augmentation, message in [
        ({"jitter_p": 1.5}, "data.augmentation.jitter_p: Input should be less than or equal to 1"),
        ({"view1": {"blur_p": {"type": "uniform", "low": 0.0, "high": 2.0}}},
         "data.augmentation.view1.blur_p: the range allows 2.0"),
        ({"crop_min_scale": 0.8, "crop_max_scale": 0.5}, "crop_min_scale (0.8) must not exceed crop_max_scale (0.5)"),
        ({"blur_sigma": [0.2, 0.1]}, "data.augmentation.blur_sigma: must satisfy 0 < low <= high (got [0.2, 0.1])"),
        ({"crop_scale": [0.5, 1.0], "crop_min_scale": 0.5}, "crop_scale is the older name of crop_min_scale"),
    ]:
        raw["data"]["augmentation"] = augmentation
        with pytest.raises(SpecError, match=re.escape(message)):
            spec_from_dict(raw)


def test_a_spec_saved_with_the_older_crop_scale_still_loads():
    """Checkpoints, exports and MLflow runs made before crop_min_scale/crop_max_scale hold `crop_scale`."""
    from ssl_tune.spec.files import spec_from_dict
    from tests.conftest import tiny_spec_dict

    spec = spec_from_dict(tiny_spec_dict(data={"augmentation": {"preset": "byol", "crop_scale": [0.5, 0.9]}}))
    assert (spec.data.augmentation.crop_min_scale, spec.data.augmentation.crop_max_scale) == (0.5, 0.9)


# --- crops of the whole picture (the image-folder cache stores it squashed, with its aspect ratio) ---


def _box_stats(area, ratio, left, top, w, h):
    """Area fraction quantiles, mean log aspect ratio (in the original's pixels), and how often the box
    reaches into each corner's tenth of the picture."""
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    corners = [((left < 0.1) & (top < 0.1)), ((left + w > 0.9) & (top < 0.1)),
               ((left < 0.1) & (top + h > 0.9)), ((left + w > 0.9) & (top + h > 0.9))]
    return (torch.quantile(area.double(), q), ratio.double().log().mean(), torch.stack([c.double().mean() for c in corners]))


@pytest.mark.parametrize("height, width", [(300, 400), (180, 320), (400, 300), (100, 500)])
def test_crops_follow_torchvision_random_resized_crop_on_the_original_picture(height, width):
    from torchvision.transforms import RandomResizedCrop

    n, scale, ratio = 20_000, (0.08, 1.0), (3 / 4, 4 / 3)
    torch.manual_seed(0)
    picture = torch.empty(1, height, width)
    boxes = torch.tensor([RandomResizedCrop.get_params(picture, list(scale), list(ratio)) for _ in range(n)], dtype=torch.float64)
    i, j, h, w = boxes.unbind(1)
    theirs = _box_stats(h * w / (height * width), w / h, j / width, i / height, w / width, h / height)

    view = ViewAugmentation(crop_scale=scale, crop_ratio=ratio)
    fw, fh, cx, cy = augment.sample_crops(n, view, torch.Generator().manual_seed(1), torch.device("cpu"),
                                          torch.full((n,), width / height))
    fw, fh, cx, cy = (t.double() for t in (fw, fh, cx, cy))
    assert (fw <= 1).all() and (fh <= 1).all()
    left, top = (cx + 1) / 2 - fw / 2, (cy + 1) / 2 - fh / 2
    assert (left >= -1e-6).all() and (left + fw <= 1 + 1e-6).all() and (top >= -1e-6).all() and (top + fh <= 1 + 1e-6).all()
    ours = _box_stats(fw * fh, fw * width / (fh * height), left, top, fw, fh)

    # torchvision rounds boxes to whole pixels; 20,000 draws leave about 0.005 of sampling error.
    torch.testing.assert_close(ours[0], theirs[0], atol=0.02, rtol=0)
    torch.testing.assert_close(ours[1], theirs[1], atol=0.02, rtol=0)
    torch.testing.assert_close(ours[2], theirs[2], atol=0.02, rtol=0)
    assert (ours[2] > 0.02).all()  # every corner of the picture is reached, a 16:9 one's too
