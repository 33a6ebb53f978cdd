"""Domain-randomised abdominal CT phantoms: the "abdomen" anatomy of SynthConfig.

Where `synthetic.make_phantom` draws an ellipse of liver in an ellipse of soft tissue, this draws
what a network has to tell the liver from on real CT: organs of liver-like HU (spleen, kidneys,
muscle, stomach wall, bowel), bone (vertebra, ribs), fluid (gallbladder) and air (stomach, bowel,
lung bases), around a lobed liver with vessels and tumours of many kinds; and it randomises what
a network should not rely on: body size and shape, field of view, contrast phase, noise,
blur, slice spacing, intensity inhomogeneity. docs/phantoms.md describes it and compares it with
a real series.

Frame (see anatomy_liver.Frame): canonical (Z, H, W); mm with x to the patient's left, y
posterior, z superior, the origin at the body's centre in-plane and at the top of the liver's
dome along z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
from scipy import ndimage

from lits.core.anatomy_liver import Frame, smooth_field, tumours, vessel_tree

PHASES = ("non-contrast", "arterial", "portal-venous")
Layer = Tuple[np.ndarray, object]  # (bool mask (Z, H, W), HU: a float or float32 (Z, H, W))


@dataclass(frozen=True)
class Phantom:
    """One synthetic volume in canonical layout.

    Attributes:
        hu: int16 (Z, H, W).
        labels: uint8 (Z, H, W), 0 background, 1 liver, 2 tumour.
        spacing: (x, y, z) mm (column, row, slice).
    """

    hu: np.ndarray
    labels: np.ndarray
    spacing: Tuple[float, float, float]


@dataclass(frozen=True)
class _Body:
    """The per-volume layout in mm (the frame's axes)."""

    a: float  # body's lateral semi-axis
    b: float  # body's AP semi-axis
    fat: float  # subcutaneous fat, mm at the flanks
    muscle: float  # abdominal wall
    liver_height: float  # dome to the right lobe's tip
    spine_y: float  # vertebral body's centre
    spine_r: float


def _contrast(rng: np.random.Generator) -> dict:
    """HU of the enhancing structures for a contrast phase drawn per volume."""
    phase = PHASES[int(rng.choice(3, p=(0.25, 0.25, 0.5)))]
    if phase == "non-contrast":
        liver = rng.uniform(45.0, 65.0)
        return dict(phase=phase, liver=liver, portal=liver - rng.uniform(8.0, 25.0), hepatic=liver - rng.uniform(8.0, 25.0),
                    aorta=rng.uniform(35.0, 50.0), ivc=rng.uniform(35.0, 50.0), cortex=rng.uniform(28.0, 38.0),
                    medulla=rng.uniform(25.0, 35.0), spleen=liver + rng.uniform(-12.0, 2.0), wall=rng.uniform(35.0, 50.0))
    if phase == "arterial":
        liver = rng.uniform(60.0, 90.0)
        return dict(phase=phase, liver=liver, portal=liver + rng.uniform(0.0, 60.0), hepatic=liver - rng.uniform(5.0, 30.0),
                    aorta=rng.uniform(200.0, 350.0), ivc=rng.uniform(70.0, 120.0), cortex=rng.uniform(150.0, 250.0),
                    medulla=rng.uniform(60.0, 110.0), spleen=liver + rng.uniform(-10.0, 40.0), wall=rng.uniform(60.0, 100.0))
    liver = rng.uniform(90.0, 130.0)
    return dict(phase=phase, liver=liver, portal=liver + rng.uniform(15.0, 60.0), hepatic=liver + rng.uniform(0.0, 50.0),
                aorta=rng.uniform(130.0, 190.0), ivc=rng.uniform(110.0, 160.0), cortex=rng.uniform(140.0, 220.0),
                medulla=rng.uniform(120.0, 200.0), spleen=liver + rng.uniform(-15.0, 15.0), wall=rng.uniform(60.0, 100.0))


def _ellipsoid(fr: Frame, centre, radii) -> np.ndarray:
    """float32 (Z, H, W) (or broadcastable): squared normalised distance from `centre` ((x, y, z) mm)."""
    return (((fr.x - centre[0]) / radii[0]) ** 2 + ((fr.y - centre[1]) / radii[1]) ** 2
            + ((fr.z - centre[2]) / radii[2]) ** 2)


def _disc(fr: Frame, centre, radii) -> np.ndarray:
    """float32 (1, H, W): squared normalised in-plane distance from `centre` ((x, y) mm): a cylinder along z."""
    return ((fr.x - centre[0]) / radii[0]) ** 2 + ((fr.y - centre[1]) / radii[1]) ** 2


def _walls(rng: np.random.Generator, fr: Frame, body: _Body) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depth mm below the skin (Z, H, W), fat thickness (1, H, W), angle from anterior (1, H, W))
    for a superellipse body with a wavy outline that breathes along z."""
    theta = np.arctan2(fr.y / body.b, fr.x / body.a)  # -pi/2 anterior, +pi/2 posterior
    n = rng.uniform(2.0, 2.8)
    rho = (np.abs(fr.x / body.a) ** n + np.abs(fr.y / body.b) ** n) ** (1.0 / n)
    edge = np.ones_like(theta)
    for k in range(2, 6):
        edge += rng.uniform(0.0, 0.03) * np.cos(k * theta + rng.uniform(0.0, 2 * np.pi))
    wobble = 1.0 + rng.uniform(0.0, 0.05) * np.sin(fr.z / rng.uniform(80.0, 250.0) * 2 * np.pi + rng.uniform(0, 6.3))
    radius = np.sqrt((body.a * np.cos(theta)) ** 2 + (body.b * np.sin(theta)) ** 2)
    depth = ((edge * wobble - rho) * radius).astype(np.float32)
    fat = body.fat * (1.0 + rng.uniform(0.0, 0.6) * -np.sin(theta))  # thicker in front, thinner on the back
    return depth, fat.astype(np.float32), np.abs((theta + 1.5 * np.pi) % (2 * np.pi) - np.pi)


def _diaphragm(rng: np.random.Generator, fr: Frame, body: _Body) -> np.ndarray:
    """float32 (1, H, W): the height (z mm) of the diaphragm; two domes, the right one the liver's top."""
    curve = rng.uniform(0.004, 0.012)
    right = -curve * ((fr.x + body.a * 0.35) ** 2 + fr.y ** 2) * 0.5
    left = -rng.uniform(10.0, 30.0) - curve * ((fr.x - body.a * 0.35) ** 2 + fr.y ** 2) * 0.5
    return np.maximum(right, left).astype(np.float32)


def _ribs(rng: np.random.Generator, fr: Frame, body: _Body, depth, fat, theta) -> np.ndarray:
    """bool (Z, H, W): ribs in the wall, arcs that run from beside the spine round the flank and
    descend towards the front, one every 25..35 mm down to the lower liver."""
    from_back = np.pi - theta  # theta: angle from the front; 0 at the spine, pi in front
    band = (depth > fat + 0.2 * body.muscle) & (depth < fat + 0.2 * body.muscle + rng.uniform(6.0, 11.0))
    ribs = np.zeros(depth.shape, dtype=bool)
    slope, height = rng.uniform(20.0, 40.0), rng.uniform(5.0, 9.0)
    level = rng.uniform(30.0, 60.0)
    while level > -body.liver_height * 0.9:
        reach = np.pi * rng.uniform(0.55, 0.9)
        along = np.abs(fr.z - (level - slope * from_back)) < height / 2
        ribs |= along & (from_back > 0.3) & (from_back < reach)
        level -= rng.uniform(25.0, 35.0)
    return ribs & band


def _spine(rng: np.random.Generator, fr: Frame, body: _Body, muscle_hu: float) -> List[Layer]:
    """Paraspinal muscles, vertebral body (cortex, cancellous bone, discs), arch and spinal canal."""
    y, r = body.spine_y, body.spine_r
    canal_r = rng.uniform(6.0, 10.0)
    canal_y = y + r + canal_r + rng.uniform(0.0, 3.0)
    layers: List[Layer] = []
    for side in (-1, 1):
        layers.append((_disc(fr, (side * rng.uniform(25.0, 40.0), canal_y + rng.uniform(0.0, 15.0)),
                             (rng.uniform(18.0, 30.0), rng.uniform(15.0, 25.0))) < 1, muscle_hu))
        psoas = _disc(fr, (side * rng.uniform(25.0, 40.0), y), (rng.uniform(10.0, 20.0), rng.uniform(10.0, 18.0))) < 1
        layers.append((psoas & (fr.z < -body.liver_height * rng.uniform(0.5, 0.8)), muscle_hu))  # below the liver
    cortex = rng.uniform(500.0, 900.0)
    arch = (_disc(fr, (0.0, canal_y), (canal_r + 6.0, canal_r + 6.0)) < 1) | (
        _disc(fr, (0.0, canal_y + canal_r + 15.0), (4.0, 16.0)) < 1)
    layers.append((arch, cortex * 0.7))
    layers.append((_disc(fr, (0.0, canal_y), (canal_r, canal_r)) < 1, rng.uniform(0.0, 20.0)))  # CSF
    vert = (_disc(fr, (0.0, y), (r, r * 0.85)) < 1)
    period, disc_h, phase = rng.uniform(28.0, 36.0), rng.uniform(6.0, 10.0), rng.uniform(0.0, 36.0)
    discs = ((fr.z + phase) % period < disc_h) & vert
    inner = (_disc(fr, (0.0, y), (r - 2.0, r * 0.85 - 2.0)) < 1) & ~discs
    layers += [(vert, cortex), (inner, rng.uniform(150.0, 300.0)), (discs, rng.uniform(70.0, 110.0))]
    return layers


def _vessels_kidneys(rng: np.random.Generator, fr: Frame, body: _Body, hu: dict) -> Tuple[List[Layer], np.ndarray, Tuple]:
    """Aorta, IVC and kidneys (cortex, medulla, sinus fat). Returns (layers, their union, IVC centre (x, y))."""
    y, r = body.spine_y, body.spine_r
    ra = rng.uniform(9.0, 14.0)
    aorta = _disc(fr, (r * 0.4 + rng.uniform(0.0, 8.0), y - r - ra - rng.uniform(1.0, 5.0)), (ra, ra)) < 1
    ivc_c = (-rng.uniform(20.0, 35.0), y - r - rng.uniform(5.0, 20.0))
    ivc = _disc(fr, ivc_c, (rng.uniform(10.0, 15.0), rng.uniform(7.0, 12.0))) < 1
    layers = [(aorta, hu["aorta"]), (ivc, hu["ivc"])]
    taken = np.broadcast_to(aorta | ivc, fr.shape).copy()
    top = -body.liver_height * rng.uniform(0.35, 0.6)
    for side in (-1, 1):
        length = rng.uniform(45.0, 60.0)
        centre = (side * rng.uniform(50.0, 75.0), y + rng.uniform(-10.0, 10.0),
                  top - length - (rng.uniform(0.0, 20.0) if side < 0 else 0.0))
        radii = np.array([rng.uniform(22.0, 32.0), rng.uniform(18.0, 28.0), length])
        outer = _ellipsoid(fr, centre, radii)
        kidney = outer < 1
        medulla = outer < (1.0 - rng.uniform(5.0, 9.0) / radii[1]) ** 2
        sinus = (_ellipsoid(fr, (centre[0] - side * radii[0] * 0.6, centre[1], centre[2]), radii * 0.5) < 1) & kidney
        layers += [(kidney, hu["cortex"]), (medulla, hu["medulla"]), (sinus, rng.uniform(-80.0, -30.0))]
        taken |= kidney
    return layers, taken, ivc_c


def _viscera(rng: np.random.Generator, fr: Frame, body: _Body, hu: dict, cavity) -> Tuple[List[Layer], np.ndarray]:
    """Bowel loops, stomach and spleen. Returns (layers, the spleen and stomach's union)."""
    ac, bc, lh = body.a * 0.8, body.b * 0.8, body.liver_height
    layers: List[Layer] = []
    for _ in range(int(rng.integers(8, 26))):
        centre = (rng.uniform(-0.8, 0.8) * ac, rng.uniform(-0.8, 0.3) * bc, -lh * rng.uniform(0.3, 1.4))
        radii = (rng.uniform(8.0, 22.0), rng.uniform(8.0, 22.0), rng.uniform(15.0, 60.0))
        r2 = np.where(cavity, _ellipsoid(fr, centre, radii), np.float32(2.0))
        content = [-1000.0, rng.uniform(0.0, 30.0), rng.uniform(150.0, 400.0), rng.uniform(-200.0, 40.0)]
        layers += [(r2 < 1, rng.uniform(30.0, 70.0)),
                   (r2 < (1 - 3.0 / min(radii[:2])) ** 2, content[int(rng.choice(4, p=(0.35, 0.35, 0.1, 0.2)))])]
    centre = (ac * rng.uniform(0.25, 0.5), -bc * rng.uniform(0.1, 0.4), -lh * rng.uniform(0.15, 0.4))
    radii = (rng.uniform(30.0, 55.0), rng.uniform(25.0, 45.0), rng.uniform(40.0, 70.0))
    r2 = _ellipsoid(fr, centre, radii)
    stomach = (r2 < 1) & cavity
    lumen = r2 < (1 - rng.uniform(3.0, 7.0) / min(radii[:2])) ** 2
    layers.append((stomach, hu["wall"]))
    kind = rng.choice(4)
    if kind == 0:  # air and fluid: supine, so the air floats to the front (-y)
        level = centre[1] + radii[1] * rng.uniform(-0.6, 0.4)
        layers += [(lumen & stomach, rng.uniform(0.0, 25.0)), (lumen & stomach & (fr.y < level), -1000.0)]
    else:
        layers.append((lumen & stomach, [-1000.0, rng.uniform(0.0, 25.0), rng.uniform(20.0, 60.0)][kind - 1]))
    centre = (ac * rng.uniform(0.6, 0.8), bc * rng.uniform(0.15, 0.45), -lh * rng.uniform(0.15, 0.4))
    radii = np.array([rng.uniform(20.0, 35.0), rng.uniform(40.0, 60.0), rng.uniform(40.0, 65.0)])
    spleen = (_ellipsoid(fr, centre, radii) < 1) & cavity
    spleen &= _ellipsoid(fr, (centre[0] - radii[0] * 1.1, centre[1] - radii[1] * 0.3, centre[2]), radii * 0.9) > 1
    layers.append((spleen, hu["spleen"]))
    return layers, stomach | spleen


def _liver(rng: np.random.Generator, fr: Frame, body: _Body, allowed: np.ndarray) -> Tuple[np.ndarray, dict]:
    """bool (Z, H, W): a right lobe, a left lobe across the midline and a caudate lobe, softly
    united and roughened, limited to `allowed`; and the points its vessels start from."""
    ac, bc, lh = body.a * 0.8, body.b * 0.8, body.liver_height
    right = (-ac * rng.uniform(0.3, 0.45), bc * rng.uniform(-0.15, 0.15), -lh * 0.4)
    right_r = (ac * rng.uniform(0.45, 0.6), bc * rng.uniform(0.6, 0.85), lh * 0.6)
    left_top, left_bottom = -rng.uniform(5.0, 25.0), -lh * rng.uniform(0.35, 0.6)
    left = (ac * rng.uniform(0.0, 0.25), -bc * rng.uniform(0.3, 0.55), (left_top + left_bottom) / 2)
    left_r = (ac * rng.uniform(0.3, 0.5), bc * rng.uniform(0.15, 0.3), (left_top - left_bottom) / 2 + 20.0)
    caudate = (-ac * 0.05, body.spine_y - body.spine_r - 25.0, -lh * 0.3)
    caudate_r = (rng.uniform(15.0, 25.0), rng.uniform(15.0, 25.0), lh * 0.2)
    k = 0.15  # soft-min width: lobes merge with a smooth waist, not a crease
    parts = [np.sqrt(_ellipsoid(fr, c, r)) - 1.0 for c, r in ((right, right_r), (left, left_r), (caudate, caudate_r))]
    field = -k * np.log(sum(np.exp(-p / k) for p in parts))
    field += rng.uniform(0.04, 0.12) * smooth_field(rng, fr, rng.uniform(40.0, 80.0))
    field += rng.uniform(0.0, 0.04) * smooth_field(rng, fr, 20.0)
    liver = (field < 0) & allowed
    starts = dict(hilum=(right[0] + right_r[0] * 0.45, right[1], -lh * 0.45), right=right)
    return liver, starts


def _draw_body(rng: np.random.Generator, fr: Frame, body: _Body, hu: dict) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU float32 (Z, H, W), the liver's mask, the region the liver may take) with everything
    but the liver's interior drawn."""
    depth, fat, theta = _walls(rng, fr, body)
    tex = smooth_field(rng, fr, rng.uniform(6.0, 20.0))
    out = np.full(fr.shape, -1000.0, dtype=np.float32)
    in_body = depth > 0
    out[in_body] = (rng.uniform(-120.0, -85.0) + 12.0 * tex)[in_body]
    muscle_hu = rng.uniform(35.0, 60.0)
    wall = (depth > fat) & (depth <= fat + body.muscle)
    out[wall] = (muscle_hu + 10.0 * tex)[wall]
    cavity = depth > fat + body.muscle
    out[cavity] = (rng.uniform(-110.0, -60.0) + 20.0 * tex)[cavity]  # visceral fat
    loops = cavity & (smooth_field(rng, fr, rng.uniform(15.0, 30.0)) > rng.uniform(-0.4, 0.5))
    out[loops] = (rng.uniform(20.0, 50.0) + 10.0 * tex)[loops]  # collapsed bowel, mesentery: more or less fat
    diaphragm = _diaphragm(rng, fr, body)
    thorax = cavity & (fr.z > diaphragm)
    heart = thorax & (_ellipsoid(fr, (body.a * 0.1, -body.b * 0.3, 60.0), (60.0, 50.0, 70.0)) < 1)
    out[thorax] = (rng.uniform(-900.0, -750.0) + 40.0 * tex)[thorax]
    out[heart] = hu["ivc"] + rng.uniform(-10.0, 10.0)
    layers, visceral = _viscera(rng, fr, body, hu, cavity & ~thorax)
    vk_layers, taken, ivc_c = _vessels_kidneys(rng, fr, body, hu)
    spine_layers = _spine(rng, fr, body, muscle_hu)
    for mask, value in layers + vk_layers + spine_layers:
        mask = mask & in_body
        out[mask] = value if np.isscalar(value) else value[mask]
    ribs = _ribs(rng, fr, body, depth, fat, theta) & in_body
    out[ribs] = rng.uniform(300.0, 800.0)
    if rng.random() < 0.7:  # the scanner table under the patient's back, curved up at the sides
        top = body.b * 1.05 + rng.uniform(0.0, 15.0) - rng.uniform(0.0, 0.002) * fr.x ** 2
        thick = rng.uniform(6.0, 20.0)
        table = (fr.y > top) & (fr.y < top + thick) & (np.abs(fr.x) < rng.uniform(200.0, 260.0)) & ~in_body
        shell = table & ((fr.y < top + 2.0) | (fr.y > top + thick - 2.0))
        out[table] = rng.uniform(-700.0, -200.0)
        out[shell] = rng.uniform(100.0, 400.0)
    gallbladder = np.zeros(fr.shape, dtype=bool)
    if rng.random() < 0.8:
        c = (-body.a * rng.uniform(0.1, 0.3), -body.b * rng.uniform(0.2, 0.45), -body.liver_height * rng.uniform(0.5, 0.75))
        gallbladder = _ellipsoid(fr, c, (rng.uniform(10.0, 18.0), rng.uniform(10.0, 18.0), rng.uniform(25.0, 45.0))) < 1
        gallbladder &= cavity
    allowed = cavity & (fr.z < diaphragm - rng.uniform(2.0, 5.0)) & ~taken & ~ribs & ~gallbladder
    allowed &= ~(_disc(fr, (0.0, body.spine_y), (body.spine_r + 20.0, body.spine_r + 40.0)) < 1)
    allowed &= ~visceral
    liver, starts = _liver(rng, fr, body, allowed)
    out[gallbladder] = rng.uniform(0.0, 20.0)
    starts["ivc"] = (ivc_c[0], ivc_c[1], -15.0)
    return out, liver, starts


def _image(rng: np.random.Generator, fr: Frame, hu: np.ndarray, body_r: float, circular: bool) -> np.ndarray:
    """int16 (Z, H, W): blur (partial volume), inhomogeneity, cupping and noise of varied strength."""
    sx, _, sz = fr.spacing
    out = ndimage.gaussian_filter(hu, (rng.uniform(0.0, 0.6) * min(1.0, 2.0 / sz), rng.uniform(0.3, 1.2),
                                       rng.uniform(0.3, 1.2)))
    inside = out > -500
    r2 = (fr.x ** 2 + fr.y ** 2) / body_r ** 2
    out += (rng.uniform(0.0, 25.0) * smooth_field(rng, fr, 120.0) + rng.uniform(0.0, 20.0) * (r2 - 0.5)) * inside
    noise = rng.standard_normal(out.shape, dtype=np.float32)
    if rng.random() < 0.5:  # correlated noise, as from a smooth reconstruction kernel
        noise = ndimage.gaussian_filter(noise, (0.0, 0.8, 0.8))
        noise /= max(float(noise.std()), 1e-6)
    out += noise * rng.uniform(5.0, 30.0)
    if circular:
        h, w = fr.shape[1:]
        yy, xx = np.mgrid[0:h, 0:w]
        out[:, (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 > (min(h, w) / 2) ** 2] = -1024.0
    return np.clip(out, -1024, 3071).astype(np.int16)


def make_abdomen(rng: np.random.Generator, size: int = 512, slices: int = 120) -> Phantom:
    """A domain-randomised abdominal CT phantom (module docstring).

    Args:
        rng: the only source of randomness.
        size: in-plane matrix size; spacing is scaled by 512 / size (0.55..1.0 mm at 512, the body
            filling 60..95% of the matrix's width).
        slices: number of axial slices (slice spacing 0.8..5 mm).
    Returns:
        Phantom (labels: 1 liver including its vessels, 2 tumour; gallbladder and all else 0).
    """
    width, fill = rng.uniform(280.0, 420.0), rng.uniform(0.6, 0.95)
    sx512 = float(np.clip(width / (fill * 512.0), 0.55, 1.0))
    sx, sz = sx512 * 512.0 / size, float(rng.uniform(0.8, 5.0))
    a = min(width, 0.95 * 512 * sx512) / 2.0
    b = a * rng.uniform(0.62, 0.85)
    fat = rng.uniform(5.0, 35.0)
    lh = rng.uniform(130.0, 200.0)
    body = _Body(a=a, b=b, fat=fat, muscle=rng.uniform(6.0, 15.0), liver_height=lh,
                 spine_y=b - fat * 0.5 - rng.uniform(65.0, 90.0), spine_r=rng.uniform(15.0, 22.0))
    centre = (size * sx * rng.uniform(-0.04, 0.04), size * sx * rng.uniform(-0.06, 0.03))
    z_mid = -lh * rng.uniform(0.1, 0.75)
    fr = Frame(z=((np.arange(slices) + 0.5 - slices / 2) * sz + z_mid).astype(np.float32)[:, None, None],
               y=((np.arange(size) - size / 2) * sx - centre[1]).astype(np.float32)[None, :, None],
               x=((np.arange(size) - size / 2) * sx - centre[0]).astype(np.float32)[None, None, :],
               spacing=(sx, sx, sz))
    hu_of = _contrast(rng)
    hu, liver, starts = _draw_body(rng, fr, body, hu_of)
    liver_hu = hu_of["liver"]
    hu[liver] = (liver_hu + rng.uniform(2.0, 8.0) * smooth_field(rng, fr, rng.uniform(10.0, 30.0)))[liver]
    portal = vessel_tree(rng, fr, starts["hilum"], (-1.0, rng.uniform(-0.3, 0.3), 0.3), rng.uniform(5.0, 7.0), 4)
    portal |= vessel_tree(rng, fr, starts["hilum"], (1.0, -0.6, 0.2), rng.uniform(3.5, 5.0), 3)
    hepatic = np.zeros_like(liver)
    for direction in ((-1.0, -0.2, -0.4), (-0.3, -1.0, -0.4), (0.6, -0.8, -0.3)):
        hepatic |= vessel_tree(rng, fr, starts["ivc"], direction, rng.uniform(4.0, 6.0), 3)
    hu[hepatic & liver] = hu_of["hepatic"]
    hu[portal & liver] = hu_of["portal"]
    tumour, tumour_hu = tumours(rng, fr, liver, liver_hu)
    hu[tumour] = tumour_hu[tumour]
    labels = liver.astype(np.uint8)
    labels[tumour] = 2
    image = _image(rng, fr, hu, float(np.hypot(body.a, body.b)), circular=rng.random() < 0.6)
    return Phantom(hu=image, labels=labels, spacing=(sx, sx, sz))
