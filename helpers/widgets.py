"""β sliders that work in a live kernel *and* in the static rendered book (chapters 4–5).

The static book has no kernel, so a slider cannot call Python. :func:`beta_slider` therefore
pre-renders one PNG frame per β into ``ipywidgets.Image`` widgets inside an
``ipywidgets.Stack`` and links the slider's index to the stack's ``selected_index`` with
``ipywidgets.jslink`` — a link that runs in the browser. myst-nb embeds the widget state in
the page and the book serves the widget JavaScript itself (``widgets_js/``), so it works
offline. In a live kernel, :func:`live_beta_slider` additionally regenerates a frame for any
β typed in.
"""
from __future__ import annotations

import io
from typing import Callable, Sequence

import torch


def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (closes the figure)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def grid_png(images: torch.Tensor, nrow: int = 8, title: str | None = None, titles=None, scale: float = 0.9,
             dpi: int = 100) -> bytes:
    """Images ``(n, 3, H, W)`` in [0, 1] as one PNG grid (same pixel size for the same inputs)."""
    from .plots import show_images

    fig = show_images(images, nrow=nrow, titles=titles, scale=scale)
    if title:
        fig.suptitle(title, fontsize=8)
    return figure_png(fig, dpi=dpi)


def beta_slider(frames: dict[str, bytes], value: str | None = None, description: str = "β"):
    """A slider over pre-rendered PNG ``frames`` (label → PNG bytes) that works without a kernel."""
    import ipywidgets as W

    if not frames:
        raise ValueError("beta_slider: give at least one frame")
    labels = list(frames)
    start = labels.index(value) if value is not None else 0
    images = [W.Image(value=png, format="png") for png in frames.values()]
    stack = W.Stack(images, selected_index=start)
    slider = W.SelectionSlider(options=[(lab, i) for i, lab in enumerate(labels)], value=start,
                               description=description, continuous_update=True,
                               layout=W.Layout(width="420px"))
    W.jslink((slider, "index"), (stack, "selected_index"))
    return W.VBox([slider, stack])


def live_beta_slider(render: Callable[[float], bytes], betas: Sequence[float], description: str = "β"):
    """In a live kernel: a float slider that calls ``render(beta) -> PNG`` on release."""
    import ipywidgets as W

    out = W.Image(value=render(betas[0]), format="png")
    slider = W.FloatSlider(value=betas[0], min=min(betas), max=max(betas), step=(max(betas) - min(betas)) / 40,
                           description=description, continuous_update=False)
    slider.observe(lambda ch: setattr(out, "value", render(ch["new"])), names="value")
    return W.VBox([slider, out])


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def check_static_slider(html_dir, page: str, chromium: str | None = None, moves: int = 2) -> dict:
    """Open a built page in headless Chromium with no kernel and no network, move its first β slider
    ``moves`` times, and return the shown frame's hash after each position plus the slider readout.

    Serves ``html_dir`` on localhost and blocks every other request, so a widget script fetched from
    a CDN would fail here. Needs ``playwright`` (the test extra) and a Chromium binary (Debian's
    ``chromium`` package). Raises ``RuntimeError`` when the page has no slider or no visible frame.
    """
    import hashlib
    import http.server
    import shutil
    import threading
    from functools import partial
    from pathlib import Path

    from playwright import sync_api

    chromium = chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("check_static_slider: no chromium binary; apt-get install chromium")
    html_dir = Path(html_dir)
    if not (html_dir / page).is_file():
        raise FileNotFoundError(f"check_static_slider: {html_dir / page} does not exist; build the book first")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep the caller's output readable
            pass

    handler = partial(Quiet, directory=str(html_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            try:
                pg = browser.new_page()
                pg.route("**/*", lambda r: r.continue_() if "127.0.0.1" in r.request.url else r.abort())
                pg.goto(f"http://127.0.0.1:{server.server_port}/{page}")
                box = pg.locator(".widget-vbox").filter(has=pg.locator(".widget-slider")).first
                try:
                    box.locator(".widget-slider").first.wait_for(state="visible", timeout=30_000)
                except sync_api.TimeoutError as e:
                    raise RuntimeError(f"check_static_slider: no slider became visible on {page}") from e
                visible = box.locator(".widget-image:visible")

                def shown():
                    if visible.count() != 1:
                        raise RuntimeError(f"check_static_slider: expected one visible frame, saw {visible.count()}")
                    return hashlib.sha256(visible.first.screenshot()).hexdigest()

                frames = [shown()]
                handle = box.locator(".noUi-handle, .ui-slider-handle").first
                handle.focus()
                for _ in range(moves):
                    handle.press("ArrowRight")
                    pg.wait_for_timeout(500)
                    frames.append(shown())
                readout = box.locator(".widget-readout").first.inner_text().strip()
            finally:
                browser.close()
    finally:
        server.shutdown()
    return {"frames": frames, "readout": readout}
