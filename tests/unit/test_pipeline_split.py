"""Pipeline stage split, placement, config checks and stage modules, without process groups."""

import copy
import itertools
import random

import pytest
import torch
from torch import nn
from torch.distributed.pipelining import ScheduleInterleaved1F1B
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from sparsetron.model.params import active_params
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.config import ParallelConfig
from sparsetron.parallel.init import SingleProcessInit
from sparsetron.parallel.pipeline import check_pipeline, layer_costs, pipeline_split, split_layers, stage_ranks
from sparsetron.parallel.precision import Precision


def brute_force(costs, n_stages, embed, head):
    """(max, sum of squares) of the best split, trying every placement of the cuts."""
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        bounds = (0, *cuts, n)
        stage = [sum(costs[a:b]) for a, b in itertools.pairwise(bounds)]
        stage[0] += embed
        stage[-1] += head
        key = (max(stage), sum(c * c for c in stage))
        best = key if best is None or key < best else best
    return best


def check_partition(ranges, n_layers, n_stages):
    assert len(ranges) == n_stages
    assert [i for r in ranges for i in r] == list(range(n_layers))  # each layer once, in order
    assert all(len(r) >= 1 for r in ranges)


def test_split_is_optimal_on_random_costs():
    rng = random.Random(0)
    for _ in range(150):
        n_layers = rng.randint(1, 9)
        n_stages = rng.randint(1, n_layers)
        costs = [rng.choice([0.5, 1.0, 1.0, 2.0, 3.7]) for _ in range(n_layers)]
        embed, head = rng.choice([0.0, 0.3]), rng.choice([0.0, 0.8, 2.5])
        ranges = split_layers(n_layers, n_stages, costs, embed, head)
        check_partition(ranges, n_layers, n_stages)
        stage = [sum(costs[i] for i in r) for r in ranges]
        stage[0] += embed
        stage[-1] += head
        best_max, best_sq = brute_force(costs, n_stages, embed, head)
        assert max(stage) == pytest.approx(best_max)
        assert sum(c * c for c in stage) == pytest.approx(best_sq)


def test_split_examples():
    assert split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # Ties go to later stages.
    assert split_layers(10, 4) == [range(0, 2), range(2, 4), range(4, 7), range(7, 10)]
    # A head worth one block takes one off the last stage.
    assert split_layers(7, 2, head_cost=1.0) == [range(0, 4), range(4, 7)]
    assert split_layers(3, 3, head_cost=5.0, embed_cost=5.0) == [range(0, 1), range(1, 2), range(2, 3)]


def test_split_refuses_more_stages_than_layers():
    with pytest.raises(ValueError, match="4 layers into 6 pipeline stages"):
        split_layers(4, 6)
    with pytest.raises(ValueError, match="3 non-negative block costs"):
        split_layers(3, 2, [1.0, -1.0, 1.0])


def tiny_configs(n_layers=4, tie=False):
    model = ModelConfig(vocab_size=96, dim=32, n_layers=n_layers, ffn_hidden=64, max_seq_len=32, tie_embeddings=tie)
    attention = AttentionConfig(n_heads=4, n_kv_heads=2)
    moe = MoEConfig(num_experts=4, top_k=2, n_shared_experts=1, first_k_dense=1, aux_loss_coeff=0.01)
    return model, attention, moe


def test_layer_costs_follow_the_flops_rule():
    model, attention, moe = tiny_configs()
    seq = 16
    embed, blocks, head = layer_costs(model, attention, moe, seq)
    assert embed == 0.0
    assert head == 6.0 * (model.dim + model.dim * model.vocab_size)
    attention_flops = 6.0 * seq * attention.n_heads * attention.head_size(model.dim)
    assert sum(blocks) + head == pytest.approx(6.0 * active_params(model, attention, moe) + 4 * attention_flops)
    assert blocks[0] < blocks[1] == blocks[2] == blocks[3]  # dense first block, then MoE blocks


@pytest.mark.parametrize("pp,per_rank", [(2, 2), (3, 2), (4, 2), (2, 3), (4, 4)])
def test_stage_placement_matches_torch(pp, per_rank):
    n = pp * per_rank
    loop = generate_stage_to_rank_mapping(pp, n, style="loop")
    assert stage_ranks(pp, per_rank, "interleaved_1f1b") == [loop[s] for s in range(n)]
    v = generate_stage_to_rank_mapping(pp, n, style="v")
    assert stage_ranks(pp, per_rank, "zero_bubble") == [v[s] for s in range(n)]
    assert stage_ranks(pp, 1, "1f1b") == list(range(pp))


def test_parallel_config_stage_counts():
    assert ParallelConfig().stages_per_rank() == 1
    assert ParallelConfig(pipeline_schedule="interleaved_1f1b").stages_per_rank() == 2
    assert ParallelConfig(pipeline_schedule="zero_bubble").stages_per_rank() == 2
    ParallelConfig(pipeline_schedule="interleaved_1f1b", pipeline_stages_per_rank=3).validate()
    for schedule, n in [("1f1b", 2), ("zero_bubble", 3), ("interleaved_1f1b", 1)]:
        with pytest.raises(ConfigError, match="parallel.pipeline_stages_per_rank"):
            ParallelConfig(pipeline_schedule=schedule, pipeline_stages_per_rank=n).validate()
    with pytest.raises(ConfigError, match="parallel.pipeline_schedule"):
        ParallelConfig(pipeline_schedule="gpipe").validate()


def test_check_pipeline_names_the_keys():
    model, _, _ = tiny_configs()
    check_pipeline(ParallelConfig(pipeline=1), 1, tiny_configs(tie=True)[0])  # nothing to check
    with pytest.raises(ConfigError, match="model.tie_embeddings"):
        check_pipeline(ParallelConfig(pipeline=2), 2, tiny_configs(tie=True)[0])
    with pytest.raises(ConfigError, match=r"parallel.pipeline: .* = 6 stages, but model.n_layers=4"):
        check_pipeline(ParallelConfig(pipeline=3, pipeline_schedule="zero_bubble"), 3, model)
    with pytest.raises(ConfigError, match=r"trainer.grad_accum_steps: .*parallel.pipeline=4 micro-batches.*got 3"):
        check_pipeline(ParallelConfig(pipeline=4), 3, model)
    with pytest.raises(ConfigError, match="parallel.compile"):
        check_pipeline(ParallelConfig(pipeline=2, pipeline_schedule="zero_bubble", compile=True), 2, model)


class _FakeStage:
    """What torch's schedule constructors read of a stage, so they run without process groups."""

    def __init__(self, index, n_stages, pp, rank):
        self.stage_index, self.num_stages, self.group_size, self.group_rank = index, n_stages, pp, rank
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self.submod = nn.Identity()


@pytest.mark.parametrize("pp", [2, 3, 4])
def test_interleaved_micro_batch_rule_matches_torch(pp):
    model = ModelConfig(vocab_size=96, n_layers=16)
    cfg = ParallelConfig(pipeline=pp, pipeline_schedule="interleaved_1f1b")
    ranks = stage_ranks(pp, 2, "interleaved_1f1b")
    for n_microbatches in range(1, 4 * pp + 2):
        try:
            for rank in range(pp):
                stages = [_FakeStage(s, 2 * pp, pp, rank) for s in range(2 * pp) if ranks[s] == rank]
                ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=lambda out, target: out)
            torch_accepts = True
        except ValueError:
            torch_accepts = False
        try:
            check_pipeline(cfg, n_microbatches, model)
            we_accept = True
        except ConfigError as err:
            assert "trainer.grad_accum_steps" in str(err) and "parallel.pipeline" in str(err)
            we_accept = False
        assert we_accept == torch_accepts, n_microbatches


def build(seed=3, n_layers=4):
    torch.manual_seed(seed)
    with torch.device("meta"):
        return Transformer(*tiny_configs(n_layers))


def one_process(seed=3, n_layers=4):
    model = build(seed, n_layers)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    return model


@pytest.mark.parametrize("schedule,pp", [("1f1b", 2), ("interleaved_1f1b", 2), ("zero_bubble", 2), ("1f1b", 3)])
def test_ranks_hold_every_parameter_once_with_one_process_values(schedule, pp):
    reference = dict(one_process().named_parameters())
    cfg = ParallelConfig(pipeline=pp, pipeline_schedule=schedule)
    held = []
    for rank in range(pp):
        model = build()
        split = pipeline_split(model, cfg, rank, pp, seq_len=16)
        assert all(p.is_meta for piece in split.unowned.values() for p in piece.parameters())
        # The stages are views of the model's own modules, and hold all of it.
        model_params = {id(p) for p in model.parameters()}
        assert {id(p) for stage in split.stages for p in stage.parameters()} == model_params
        model.to_empty(device="cpu")
        with torch.no_grad(), split.whole_model(model), SingleProcessInit():
            assert len(dict(model.named_parameters())) == len(reference)
            model.init_weights()
        for name, p in model.named_parameters():
            assert torch.equal(p, reference[name]), name
            held.append(name)
        attentions = [m for m in model.modules() if hasattr(m, "rope_cos")]
        assert attentions and not any(m.rope_cos.is_meta or m.rope_sin.is_meta for m in attentions)
    assert sorted(held) == sorted(reference)


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b", "zero_bubble"])
def test_stages_in_order_compute_the_model(schedule):
    pp = 2
    reference = one_process(n_layers=5 if schedule == "1f1b" else 4)
    cfg = ParallelConfig(pipeline=pp, pipeline_schedule=schedule)
    stages = {}
    for rank in range(pp):
        split = pipeline_split(copy.deepcopy(reference), cfg, rank, pp, seq_len=16)
        stages.update(zip(split.stage_indices, split.stages, strict=True))
    tokens = torch.randint(0, 96, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    seq = reference.sequence_info(tokens, doc_ids)
    for precision in (Precision(torch.float32), Precision(torch.bfloat16)):
        x = tokens
        with torch.no_grad():
            for s in range(len(stages)):
                stages[s].precision = precision
                # As the schedule runs them: the step's sequences, and the micro-batch to pick.
                stages[s].sequences, stages[s].microbatch = [None, seq], 1
                x = stages[s](x)
                if s < len(stages) - 1:
                    # PipelineSchedule's static metadata: hidden states in the policy's activation dtype.
                    assert x.dtype == precision.activation_dtype
            with precision.autocast("cpu"):
                expected = reference(tokens, seq)
        assert x.dtype == precision.activation_dtype
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
