"""moe_course.viz: every plot returns a Figure, draws where asked, and leaks no figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moe_course import metrics, viz, zoo  # noqa: E402
from moe_course.layers import SoftMoE, SparseMoE  # noqa: E402


@pytest.fixture(autouse=True)
def no_leaked_figures():
    plt.close("all")
    yield
    leaked = plt.get_fignums()
    plt.close("all")
    assert leaked == [], "a test left figures open"


def close(fig):
    assert isinstance(fig, Figure)
    assert plt.fignum_exists(fig.number)
    plt.close(fig)
    return fig


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.moes = nn.ModuleList([SparseMoE(8, 6, 16, k=2), SparseMoE(8, 6, 16, k=2, num_shared_experts=1)])

    def forward(self, ids):
        x = self.emb(ids)
        for m in self.moes:
            x = x + m(x)
        return x


@pytest.fixture(scope="module")
def stats():
    torch.manual_seed(0)
    return metrics.routing_stats(TwoLayer(), torch.randint(0, 10, (8, 12)))


@pytest.mark.parametrize("make", [
    lambda: SparseMoE(8, 8, 16, k=2),
    lambda: SparseMoE(8, 64, 16, k=2, num_shared_experts=2, capacity_factor=1.25),
    lambda: SoftMoE(8, 4, 16),
    lambda: TwoLayer(),
    lambda: {"d_model": 32, "d_hidden": 64, "num_experts": 8, "k": 2},
    lambda: {"d_model": 32, "d_hidden": 64, "n_layers": 4, "n_heads": 4, "num_experts": 8, "k": 2,
             "ffn": "moe", "vocab_size": 65, "context_length": 128},
    lambda: {"d_model": 32, "d_hidden": 64, "n_layers": 2, "ffn": "dense", "input_length": 40,
             "num_tokens": 20, "num_classes": 10, "mixer": "conv"},
])
def test_plot_architecture_returns_figure(make):
    fig = close(viz.plot_architecture(make()))
    assert any(ax.patches for ax in fig.axes)  # drawn with patches


def test_plot_architecture_real_models():
    models = pytest.importorskip("moe_course.models")
    for name in zoo.NAMES:
        cfg, _ = zoo.preset_configs("test", name)
        fig = close(viz.plot_architecture(models.model_from_config(cfg)))
        assert len(fig.axes) == 2
        assert str(cfg.n_layers) in fig.axes[0].get_title()


def test_plot_architecture_errors():
    with pytest.raises(ValueError, match="model_or_config"):
        viz.plot_architecture(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model_or_config"):
        viz.plot_architecture({"k": 2})
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="ax"):
        viz.plot_architecture({"d_model": 8, "d_hidden": 8, "n_layers": 2}, ax=ax)
    plt.close(fig)


def test_plot_expert_utilization(stats):
    fig = close(viz.plot_expert_utilization(stats))
    visible = [a for a in fig.axes if a.get_visible()]
    assert len(visible) == len(stats.layers)
    bars = [p.get_height() for p in visible[0].patches]
    assert bars == pytest.approx(stats.layers[0].frequency.tolist())
    uniform = visible[0].lines[0].get_ydata()
    assert uniform[0] == pytest.approx(1 / 6)

    fig, ax = plt.subplots()
    assert viz.plot_expert_utilization(stats, layer=1, ax=ax) is fig
    close(fig)
    close(viz.plot_expert_utilization(torch.tensor([[1.0, 3.0], [2.0, 2.0]])))
    with pytest.raises(ValueError, match="layer"):
        viz.plot_expert_utilization(stats, layer=5)


def test_plot_routing_heatmap_inputs(stats):
    layer = stats.layers[0]
    text = "To be, or not"
    n = len(text)
    fig = close(viz.plot_routing_heatmap(list(text), layer.logits[:n].softmax(-1)))
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (6, n)  # experts x tokens
    fig = close(viz.plot_routing_heatmap(text, layer.indices[:n], num_experts=6, weights=layer.gate_weights[:n]))
    image = fig.axes[0].images[0].get_array()
    assert image.sum() == pytest.approx(float(layer.gate_weights[:n].sum()), rel=1e-5)
    close(viz.plot_routing_heatmap(None, layer.indices[:n]))
    r = SparseMoE(8, 6, 16, k=2)
    r(torch.randn(n, 8))
    fig = close(viz.plot_routing_heatmap(text, r.last_routing, title="layer 0"))
    assert fig.axes[0].collections  # the top-k choices are ringed
    fig = close(viz.plot_routing_heatmap(None, layer, max_tokens=20))
    assert fig.axes[0].images[0].get_array().shape == (6, 20)
    with pytest.raises(ValueError, match="tokens"):
        viz.plot_routing_heatmap(["a"], layer.indices[:n])
    with pytest.raises(ValueError, match="indices_or_probs"):
        viz.plot_routing_heatmap(None, layer.indices[:n], num_experts=2)


class FakeHistory:
    def __init__(self, offset=0.0):
        self.steps = list(range(50))
        self.train_loss = [3.0 * 0.95**i + offset for i in range(50)]
        self.eval_steps = [0, 25, 49]
        self.eval_metrics = [{"loss": 3.0, "accuracy": 0.1}, {"loss": 1.0, "accuracy": 0.5},
                             {"loss": 0.5, "accuracy": 0.8}]


def test_plot_loss_curves_single_and_many():
    fig = close(viz.plot_loss_curves(FakeHistory()))
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "eval accuracy"
    loss_ax = fig.axes[0]
    assert len(loss_ax.lines) == 3  # raw, smoothed, eval
    smoothed = loss_ax.lines[1].get_ydata()
    assert smoothed[0] == pytest.approx(3.0)  # debiased EMA starts at the first value
    fig = close(viz.plot_loss_curves({"a": FakeHistory(), "b": vars(FakeHistory(0.2))}, smoothing=0))
    assert len(fig.axes[0].lines) == 6
    fig, ax = plt.subplots()
    assert viz.plot_loss_curves(FakeHistory(), ax=ax) is fig
    close(fig)
    with pytest.raises(TypeError, match="history"):
        viz.plot_loss_curves({"a": 1})
    with pytest.raises(ValueError, match="smoothing"):
        viz.plot_loss_curves(FakeHistory(), smoothing=1.0)


def test_plot_loss_curves_accepts_train_history():
    train = pytest.importorskip("moe_course.train")
    h = train.History(steps=[0, 1, 2], train_loss=[2.0, 1.5, 1.2], eval_steps=[2],
                      eval_metrics=[{"loss": 1.3, "perplexity": 3.7}])
    fig = close(viz.plot_loss_curves(h))
    assert fig.axes[1].get_ylabel() == "eval perplexity"


def test_plot_race_lines_and_bars():
    fig = close(viz.plot_race({"naive": {64: 5.0, 256: 20.0}, "loop": {64: 1.0, 256: 2.0}}, title="dispatch"))
    assert [line.get_label() for line in fig.axes[0].lines] == ["naive", "loop"]
    fig = close(viz.plot_race({"naive": 5.0, "loop": 1.0}))
    assert [p.get_height() for p in fig.axes[0].patches] == [5.0, 1.0]
    with pytest.raises(ValueError, match="results"):
        viz.plot_race({})


def test_use_course_style_sets_rcparams():
    with plt.rc_context():
        viz.use_course_style()
        assert plt.rcParams["figure.dpi"] == 100
        assert plt.rcParams["axes.grid"] is True
    before = dict(plt.rcParams)
    close(viz.plot_race({"a": 1.0}))
    assert plt.rcParams["axes.grid"] == before["axes.grid"]  # plotting leaves globals alone


def test_table_formats_numbers_and_hides_the_index():
    import pandas as pd

    from moe_course import viz

    df = pd.DataFrame({"model": ["a", "b"], "bytes": [1234567, 89], "ppl": [6.85712, 7.1]})
    html = viz.table(df, digits={"ppl": 2}).to_html()
    assert "1,234,567" in html and "6.86" in html and "6.85712" not in html
    assert ">0<" not in html  # no 0..n index column
    assert viz.table(df, digits={"ppl": 2}).to_html() == html  # deterministic ids
    assert "1,234,567" in repr(viz.table(df)) and "0x" not in repr(viz.table(df))
    with pytest.raises(TypeError, match="df"):
        viz.table([1, 2])


@pytest.mark.parametrize("make", [
    lambda: SparseMoE(8, 8, 16, k=2),
    lambda: SparseMoE(8, 64, 16, k=2, num_shared_experts=2, capacity_factor=1.25),
    lambda: SoftMoE(8, 4, 16),
    lambda: {"d_model": 32, "d_hidden": 64, "n_layers": 4, "n_heads": 4, "num_experts": 8, "k": 2,
             "ffn": "moe", "vocab_size": 65, "context_length": 128},
    lambda: {"d_model": 32, "d_hidden": 64, "n_layers": 2, "ffn": "soft", "num_experts": 4,
             "input_length": 40, "num_tokens": 20, "num_classes": 10, "mixer": "conv"},
])
def test_plot_architecture_text_is_readable_at_page_width(make):
    """The diagrams are drawn at most 7.5 in wide (the page column) with every label >= 10 pt,
    so the page never scales them down and a phone (~360 px) still shows ~6 px text or more."""
    from matplotlib.text import Text

    fig = viz.plot_architecture(make())
    try:
        width, _ = fig.get_size_inches()
        assert width <= 7.5
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert len(texts) >= 8
        small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 10]
        assert not small, f"text under 10 pt: {small}"
        # the labels stay inside the figure (nothing clipped at the page's edge)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        fw, fh = fig.bbox.width, fig.bbox.height
        for t in texts:
            bb = t.get_window_extent(renderer)
            assert bb.x0 >= -1 and bb.x1 <= fw + 1 and bb.y0 >= -1 and bb.y1 <= fh + 1, t.get_text()
    finally:
        plt.close(fig)
