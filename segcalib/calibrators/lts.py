"""Local temperature scaling (LTS; Ding, Lieberman, Ma & Wang, "Local Temperature Scaling for
Probability Calibration", ICCV 2021), 2D and 3D.

A small convolutional network maps the uncalibrated softmax probabilities (bounded inputs: raw
logits, up to tens in magnitude, made the net overfit and its ReLUs die in our tests) -- optionally
concatenated with the image, standardised per case -- to one temperature per voxel,
``T = softplus(net(x)) + t_floor > 0``, and ``p = softmax(z / T)``.
Since ``T > 0`` at every voxel, the argmax and the per-voxel class order are preserved.

Bounded fitting: :meth:`update` keeps only random crops (``crop`` voxels per axis, ``crops_per_case``
per case, each centred on a random voxel of the fit region) in a reservoir of random keys holding at
most ``max_voxels`` crop voxels -- never whole cases. :meth:`fit` first fits one global temperature
on the buffered region voxels and starts the network at exactly that constant (last layer's weights
0, bias ``softplus^-1(T - t_floor)``), so LTS starts from temperature scaling; then Adam minimises the
mean NLL of the region voxels over mini-batches of crops. The weights are saved through
:meth:`tensors` (safetensors), the architecture through :meth:`get_params`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcalib.calibrators.base import Calibrator, Spacing
from segcalib.calibrators.registry import register_calibrator
from segcalib.calibrators.sample import _labels_and_mask
from segcalib.errors import ConfigError, DataError
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS, T_BOUNDS, fit_temperature


def temperature_net(in_channels: int, spatial_dims: int, hidden: int, layers: int) -> nn.Sequential:
    """``layers`` 3^d convolutions (replicate padding, ReLU between) from ``in_channels`` to 1 channel."""
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
    modules: list[nn.Module] = []
    width = in_channels
    for _ in range(layers - 1):
        modules += [conv(width, hidden, 3, padding=1, padding_mode="replicate"), nn.ReLU()]
        width = hidden
    modules.append(conv(width, 1, 3, padding=1, padding_mode="replicate"))
    return nn.Sequential(*modules)


_T0_VOXELS = 2**18


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _standardise(image: Tensor) -> Tensor:
    """Per case and channel zero mean, unit standard deviation (``(B, Cin, *S)``, float32)."""
    x = image.float()
    dims = tuple(range(2, x.dim()))
    return (x - x.mean(dim=dims, keepdim=True)) / x.std(dim=dims, keepdim=True).clamp_min(1e-6)


@register_calibrator("lts")
class LocalTemperatureScaling(Calibrator):
    """Per-voxel temperature from a small conv net on the logits (and optionally the image).

    Args:
        num_classes: C.
        seed: seed of the crop positions, the reservoir keys, the initial weights and the batch order.
        max_voxels: crop voxels kept in the buffer (at least one crop).
        crop: crop edge in voxels (clipped to the volume).
        crops_per_case: crops offered per case.
        use_image: also feed the image ``(B, Cin, *S)`` (then required by update and transform).
        hidden: channels of the hidden layers.
        layers: convolution layers (>= 1; 1 = a linear 3^d filter).
        t_floor: smallest temperature.
        steps: Adam steps.
        batch_crops: crops per step.
        lr: Adam learning rate.
        device: where the network trains: ``cpu``, ``cuda`` or ``auto`` (CUDA when available); the
            buffer stays on the CPU and one mini-batch at a time moves. Transform runs on the logits' device.
    """

    preserves_argmax = True
    preserves_order = True

    def __init__(
        self,
        num_classes: int,
        *,
        seed: int = 0,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        crop: int = 32,
        crops_per_case: int = 4,
        use_image: bool = False,
        hidden: int = 16,
        layers: int = 3,
        t_floor: float = 0.05,
        steps: int = 200,
        batch_crops: int = 4,
        lr: float = 0.01,
        device: str = "cpu",
    ) -> None:
        super().__init__(
            num_classes, seed=seed, max_voxels=max_voxels, crop=crop, crops_per_case=crops_per_case,
            use_image=use_image, hidden=hidden, layers=layers, t_floor=t_floor, steps=steps,
            batch_crops=batch_crops, lr=lr, device=device,
        )
        for key, value, low in (("crop", crop, 1), ("crops_per_case", crops_per_case, 1), ("hidden", hidden, 1),
                                ("layers", layers, 1), ("steps", steps, 0), ("batch_crops", batch_crops, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"calibrator 'lts': {key} must be an integer >= {low}, got {value!r}")
        for key, value in (("t_floor", t_floor), ("lr", lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"calibrator 'lts': {key} must be a number in (0, 1), got {value!r}")
        if not isinstance(use_image, bool):
            raise ConfigError(f"calibrator 'lts': use_image must be true or false, got {use_image!r}")
        self.crop, self.crops_per_case, self.use_image = crop, crops_per_case, use_image
        self.hidden, self.layers, self.t_floor = hidden, layers, float(t_floor)
        self.steps, self.batch_crops, self.lr = steps, batch_crops, float(lr)
        if device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"calibrator 'lts': device must be 'cpu', 'cuda' or 'auto', got {device!r}")
        self.device = device
        self.net: nn.Sequential | None = None
        self.spatial_dims: int | None = None
        self.image_channels = 0
        self.reset()

    # ----- the crop buffer ------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Crops kept at most (``max_voxels`` crop voxels, at least one crop)."""
        return max(1, self.max_voxels // (self.crop ** (self.spatial_dims or 3)))

    def reset(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)
        self.crops: list[dict[str, Tensor]] = []
        self.keys = torch.empty(0)
        self.offered = 0
        self.net = None
        self.spatial_dims = None
        self.image_channels = 0
        self.fitted = False

    def update(
        self,
        logits: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        *,
        spacing: Spacing = None,
        image: Tensor | None = None,
    ) -> None:
        """Offer one batch: ``crops_per_case`` crops per case, centred on random fit-region voxels."""
        self._check_logits(logits)
        labels, keep = _labels_and_mask(logits, target, mask, self.num_classes)
        self._check_geometry(logits, image)
        spatial = logits.shape[2:]
        labels, keep = labels.view(logits.shape[0], *spatial), keep.view(logits.shape[0], *spatial)
        image = _standardise(image).cpu() if self.use_image and image is not None else None
        label_dtype = torch.int16 if self.num_classes <= 2**15 else torch.int64
        size = [min(self.crop, n) for n in spatial]
        for b in range(logits.shape[0]):
            inside = keep[b].reshape(-1).nonzero().squeeze(1)
            if inside.numel() == 0:
                continue
            picks = inside[torch.randint(inside.numel(), (self.crops_per_case,), generator=self._generator)]
            keys = torch.rand(self.crops_per_case, generator=self._generator)
            for flat, key in zip(picks.tolist(), keys):
                centre = torch.unravel_index(torch.tensor(flat), spatial)
                box = tuple(
                    slice(start, start + s)
                    for start, s in (
                        (min(max(int(c) - s // 2, 0), n - s), s) for c, s, n in zip(centre, size, spatial)
                    )
                )
                crop = {
                    "z": logits[(b, slice(None), *box)].detach().float().cpu().clone(),
                    "y": labels[(b, *box)].to(label_dtype),
                    "m": keep[(b, *box)].clone(),
                }
                if image is not None:
                    crop["i"] = image[(b, slice(None), *box)].clone()
                self._insert([crop], key.reshape(1))
            self.offered += self.crops_per_case

    def _insert(self, crops: list[dict[str, Tensor]], keys: Tensor) -> None:
        self.crops += crops
        self.keys = torch.cat([self.keys, keys])
        if len(self.crops) > self.capacity:
            top = torch.topk(self.keys, self.capacity, sorted=False).indices.sort().values
            self.crops = [self.crops[i] for i in top.tolist()]
            self.keys = self.keys[top]

    def merge(self, other: Calibrator) -> None:
        self._check_mergeable(other)
        assert isinstance(other, LocalTemperatureScaling)
        if other.spatial_dims is None:
            return
        if self.spatial_dims not in (None, other.spatial_dims) or (
            self.spatial_dims is not None and self.image_channels != other.image_channels
        ):
            raise ValueError("cannot merge LTS buffers of different dimensionality or image channels")
        self.spatial_dims, self.image_channels = other.spatial_dims, other.image_channels
        self._insert(list(other.crops), other.keys.clone())
        self.offered += other.offered

    def _check_geometry(self, logits: Tensor, image: Tensor | None) -> None:
        dims = logits.dim() - 2
        if dims not in (2, 3):
            raise DataError(
                f"calibrator 'lts': logits must be 2D or 3D (B, C, *spatial), got shape {tuple(logits.shape)}"
            )
        channels = 0
        if self.use_image:
            matching = image is not None and image.dim() == logits.dim() and image.shape[0] == logits.shape[0]
            if not matching or image.shape[2:] != logits.shape[2:]:
                raise DataError(
                    "calibrator 'lts': use_image needs an image (B, Cin, *spatial) matching logits "
                    f"{tuple(logits.shape)}, "
                    f"got {None if image is None else tuple(image.shape)}"
                )
            channels = image.shape[1]
        if self.spatial_dims is not None and (dims, channels) != (self.spatial_dims, self.image_channels):
            raise DataError(
                f"calibrator 'lts': fitted for {self.spatial_dims}D inputs with {self.image_channels} image channels, "
                f"got {dims}D with {channels}"
            )
        self.spatial_dims, self.image_channels = dims, channels

    def _features(self, logits: Tensor, image: Tensor | None) -> Tensor:
        """Network input ``(B, C [+ Cin], *S)``: softmax probabilities [+ the image, already standardised]."""
        x = torch.softmax(logits.detach().float(), dim=1)
        return x if image is None else torch.cat([x, image.to(x.device, torch.float32)], dim=1)

    # ----- fitting and applying -------------------------------------------------------------
    def _build_net(self) -> nn.Sequential:
        assert self.spatial_dims is not None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return temperature_net(self.num_classes + self.image_channels, self.spatial_dims, self.hidden, self.layers)

    def _temperature(self, net: nn.Module, x: Tensor) -> Tensor:
        return F.softplus(net(x)) + self.t_floor

    def _fit(self) -> None:
        if not self.crops:
            raise DataError("calibrator 'lts': no voxels were offered (empty fit region?)")
        if not all(torch.isfinite(c["z"]).all() for c in self.crops):
            raise DataError("calibrator 'lts': the fit region holds non-finite logits (NaN or inf)")
        # the starting constant: T on at most _T0_VOXELS region voxels of the buffer (evenly strided)
        n_region = sum(int(c["m"].sum()) for c in self.crops)
        stride = max(1, math.ceil(n_region / _T0_VOXELS))
        z = torch.cat([c["z"].reshape(self.num_classes, -1)[:, c["m"].reshape(-1)] for c in self.crops], dim=1)
        y = torch.cat([c["y"][c["m"]].long() for c in self.crops])
        t0 = min(max(fit_temperature(z[:, ::stride].T, y[::stride]), T_BOUNDS[0]), T_BOUNDS[1])
        del z, y
        net = self._build_net()
        last = net[-1]
        assert isinstance(last, (nn.Conv2d, nn.Conv3d))
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(_inverse_softplus(max(t0 - self.t_floor, 1e-6)))
        device = self._train_device()
        net = net.to(device)
        optimiser = torch.optim.Adam(net.parameters(), lr=self.lr)
        order = torch.Generator().manual_seed(self.seed + 1)
        for _ in range(self.steps):
            pick = torch.randint(len(self.crops), (self.batch_crops,), generator=order).tolist()
            optimiser.zero_grad()
            region = sum(int(self.crops[i]["m"].sum()) for i in pick)
            for i in pick:
                c = {key: value.to(device).unsqueeze(0) for key, value in self.crops[i].items()}
                t = self._temperature(net, self._features(c["z"], c.get("i")))
                nll = F.cross_entropy(c["z"] / t, c["y"].long(), reduction="none")
                (nll[c["m"]].sum() / region).backward()
            optimiser.step()
        self.net = net.cpu().eval()

    def _train_device(self) -> torch.device:
        if self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ConfigError("calibrator 'lts': device 'cuda' was asked for but no CUDA GPU is available")
        return torch.device("cuda")

    def temperature_map(self, logits: Tensor, image: Tensor | None = None) -> Tensor:
        """The per-voxel temperature ``(B, 1, *S)`` (float32, on ``logits``' device)."""
        self._check_fitted()
        self._check_geometry(logits, image)
        assert self.net is not None
        net = self.net.to(logits.device)
        with torch.no_grad():
            standardised = _standardise(image) if self.use_image and image is not None else None
            return self._temperature(net, self._features(logits, standardised))

    def _transform(self, logits: Tensor, *, spacing: Spacing, image: Tensor | None) -> Tensor:
        return torch.softmax(logits / self.temperature_map(logits, image), dim=1)

    def _state(self) -> dict[str, Any]:
        return {"spatial_dims": self.spatial_dims, "image_channels": self.image_channels}

    def tensors(self) -> dict[str, Tensor]:
        self._check_fitted()
        assert self.net is not None
        return {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}

    def _load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        dims, channels = state.get("spatial_dims"), state.get("image_channels")
        if dims not in (2, 3) or isinstance(channels, bool) or not isinstance(channels, int) or channels < 0:
            raise DataError(
                "calibrator 'lts': parameters 'spatial_dims' (2 or 3) and 'image_channels' (>= 0) are required"
            )
        if (channels > 0) != self.use_image:
            raise DataError(f"calibrator 'lts': image_channels = {channels} contradicts use_image = {self.use_image}")
        self.spatial_dims, self.image_channels = dims, channels
        net = self._build_net()
        expected = net.state_dict()
        given = {k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}
        if set(given) != set(expected) or any(given[k].shape != expected[k].shape for k in expected):
            raise DataError(
                f"calibrator 'lts': weights must be the tensors {sorted('net.' + k for k in expected)} with the "
                "shapes of the stored architecture"
            )
        if not all(torch.isfinite(v).all() for v in given.values()):
            raise DataError("calibrator 'lts': weights hold non-finite values")
        net.load_state_dict({k: v.float() for k, v in given.items()})
        self.net = net.eval()
