"""RPO: Reward Preference Optimization for subject-driven generation (Miao et al., NeurIPS 2024).

docs/algorithms/rpo_lambda_harmonic.md §4–§7. Given 3–6 photos of a subject, fine-tune only the U-Net:

1. once, before training: the frozen model generates ``negatives_per_prompt`` images for each of the novel
   training prompts ("a [V] dog on the Moon", ...), and the λ_train-Harmonic reward scores every reference photo
   and every negative against those prompts;
2. every step, for each pair (reference r with the instance prompt, negative g with its novel prompt p_k):
   draw y ~ Bernoulli(σ(R(r, p_k) − R(g, p_k))); noise both images *independently* (own t and ε);
   L = L_sim + L_pref with L_sim = e_θ(r) and L_pref the logistic loss on
   s = [e_ref(r) − e_θ(r)] − [e_ref(g) − e_θ(g)] (pure functions in :mod:`trainers.losses_rpo`);
3. every ``validation_every`` steps: generate validation images, score them with the λ_val-Harmonic reward
   (identifier removed from the prompts) and keep the best checkpoint (keep-best, not patience).

At the end the best model (and the base model) are evaluated DreamBench-style (DINO, CLIP-I, CLIP-T).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from genreward.errors import GenrewardError
from genreward.images import load_images, save_png
from genreward.prompts import PromptItem
from genreward.rewards.base import RewardSpec, build_from_spec
from genreward.rewards.lambda_harmonic import LambdaHarmonic
from genreward.sampling import decode_latents
from genreward.schema import ModelConfig, SampleConfig
from trainers.common import (
    OptimSection,
    RunConfig,
    Timer,
    TrainingRun,
    TrainSection,
    derived_seed,
    load_unet_weights,
    param_digest,
    peak_rss_mb,
    plot_reward_curve,
    save_unet_weights,
    training_progress,
)
from trainers.run_dir import CheckpointSection, fault_point
from trainers.losses_rpo import (
    bradley_terry_probability,
    per_image_mse,
    rpo_loss,
    sample_preference_labels,
    select_best,
)

log = logging.getLogger("genreward.rpo")

# Novel training prompts (§5): 8 per kind, after the released code's lists (Van Gogh, Moon, green colour, Great
# Wall, wooden roof, Statue of Liberty, volcano, subway platform; live subjects swap some for outfits/swimming).
# The wording here is this project's; set rpo.training_prompts to use other prompts.
OBJECT_TRAINING_PROMPTS = [
    "a {identifier} {class_noun} in the style of a Van Gogh painting",
    "a {identifier} {class_noun} on the surface of the Moon",
    "a green {identifier} {class_noun}",
    "a {identifier} {class_noun} with the Great Wall of China in the background",
    "a {identifier} {class_noun} on a wooden roof",
    "a {identifier} {class_noun} in front of the Statue of Liberty",
    "a {identifier} {class_noun} near an erupting volcano",
    "a {identifier} {class_noun} on a subway platform",
]
LIVE_TRAINING_PROMPTS = [
    "a {identifier} {class_noun} in the style of a Van Gogh painting",
    "a {identifier} {class_noun} on the surface of the Moon",
    "a {identifier} {class_noun} wearing a superhero outfit",
    "a {identifier} {class_noun} with the Great Wall of China in the background",
    "a {identifier} {class_noun} swimming in a pool",
    "a {identifier} {class_noun} in front of the Statue of Liberty",
    "a {identifier} {class_noun} near an erupting volcano",
    "a {identifier} {class_noun} wearing a knitted sweater",
]


@dataclass
class SubjectSection:
    """The subject: reference photos, its class noun and the identifier token "[V]"."""

    references: str = "???"  # folder of 3–6 photos, or skimage:NAME (photos written by code to OUTPUT/references)
    class_noun: str = "dog"
    identifier: str = "sks"
    live: bool | None = None  # live subject (dog, cat) → live prompt lists; None = from class_noun

    def __post_init__(self) -> None:
        if not self.identifier or any(c.isspace() for c in self.identifier):
            raise ValueError(f"key 'subject.identifier' must be one word without spaces, got {self.identifier!r}")
        if not self.class_noun.strip():
            raise ValueError("key 'subject.class_noun' must not be empty")


@dataclass
class RPOSection:
    """RPO hyperparameters; defaults = the released code / paper (§8). Uncertain points are options."""

    max_train_steps: int = 400
    batch_size: int = 1  # pairs per optimiser step (per process)
    instance_prompt: str = "a photo of {identifier} {class_noun}"
    training_prompts: list[str] | None = None  # None = the built-in 8 (objects or live subjects)
    validation_prompts: list[str] | None = None  # None = the training prompts (as the released code; leak-prone)
    negatives_per_prompt: int = 4  # 4 ⇒ 32 negatives ("3%" in the paper); the released script uses 16
    pairing: Literal["all", "released_code"] = "all"  # all (reference, negative) pairs, or the code's M-item dataset
    lambda_train: float = 0.0  # λ of the label reward (0 = text alignment only, as the code)
    lambda_val: float = 0.5  # λ of model selection (headline 0.5; 0.3 / 0.7 also reported; script default 0.3)
    beta: float = 1.0  # scale on s; 1.0 reproduces the released code (which never applies β)
    similarity_weight: float = 1.0
    preference_weight: float = 1.0  # 0 ⇒ DreamBooth without prior preservation
    label_reward_prompt: Literal["keep_identifier", "remove_identifier"] = "keep_identifier"  # §10.2: code keeps it
    validation_every: int = 40
    num_validation_images: int = 4
    validation_seed: int = 0
    resolution: int | None = None  # training/validation size in pixels (None = the U-Net's native size)

    def __post_init__(self) -> None:
        for name in ("max_train_steps", "batch_size", "negatives_per_prompt", "validation_every", "num_validation_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"key 'rpo.{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("lambda_train", "lambda_val"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"key 'rpo.{name}' must be in [0, 1], got {getattr(self, name)}")
        if self.beta <= 0:
            raise ValueError(f"key 'rpo.beta' must be > 0, got {self.beta}")
        if self.training_prompts is not None and not self.training_prompts:
            raise ValueError("key 'rpo.training_prompts' must list at least one prompt (or be null for the built-in list)")


@dataclass
class RPOEvalSection:
    """DreamBench-style evaluation of the base and the selected model after training (§9)."""

    enabled: bool = True
    prompts_limit: int | None = None  # first N of the 25 DreamBench prompts
    images_per_prompt: int = 4
    seed: int = 0
    compare_base: bool = True
    dino_model: str = "facebook/dino-vits16"
    clip_model: str = "openai/clip-vit-base-patch16"


@dataclass
class RPOConfig(RunConfig):
    """``trainer: rpo``. Checkpoints count optimiser steps: ``checkpoint-<steps done>``, saved at every validation
    (and every ``checkpoint.every`` steps when set)."""

    trainer: Literal["rpo"] = "rpo"
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(num_steps=50, guidance_scale=7.5, eta=0.0))
    subject: SubjectSection = field(default_factory=SubjectSection)
    reward: RewardSpec = field(
        default_factory=lambda: RewardSpec(name="lambda_harmonic", options={"backend": "align", "model": "kakaobrain/align-base"})
    )
    rpo: RPOSection = field(default_factory=RPOSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(trainable="full", optim=_paper_optim(), chunk_size=1))
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(every=0, total_limit=1))
    eval: RPOEvalSection = field(default_factory=RPOEvalSection)


def _paper_optim() -> OptimSection:
    return OptimSection(lr=5e-6, weight_decay=1e-2, max_grad_norm=1.0)


# ------------------------------------------------------------------------------------------- helpers


def fill(template: str, subject: SubjectSection) -> str:
    from genreward.dreambench import fill_template

    return fill_template(template, subject.identifier, subject.class_noun)


def is_live(subject: SubjectSection) -> bool:
    from genreward.dreambench import LIVE_NOUNS

    return subject.live if subject.live is not None else subject.class_noun.strip().lower() in LIVE_NOUNS


def check_identifier(tokenizer, identifier: str) -> int:
    """Number of tokens the pipeline's tokenizer makes of the identifier; warns when it is split.

    A split identifier still works (the U-Net learns the token sequence), but DreamBooth/RPO pick a rare word
    that is one token (e.g. "sks") so that the subject binds to one embedding.
    """
    ids = tokenizer(identifier, add_special_tokens=False)["input_ids"]
    if len(ids) > 1:
        log.warning(
            "subject.identifier %r is split into %d tokens by the pipeline's tokenizer (%s); it works, but a rare "
            "single-token word such as 'sks' binds the subject to one embedding",
            identifier, len(ids), " ".join(tokenizer.convert_ids_to_tokens(ids)),
        )
    return len(ids)


def pair_indices(item: int, pairing: str, n_refs: int, n_prompts: int, n_neg: int, seed: int) -> tuple[int, int, int]:
    """(reference m, prompt k, negative j) of training item ``item`` (§5, §10.10).

    ``released_code``: the dataset has M items; item m pairs reference m, prompt m mod K and negative m mod n.
    ``all``: the dataset is every (prompt, negative) combination (K·n items, reshuffled each pass by a derived
    seed); reference m = position mod M, so every negative is used and every reference recurs.
    """
    if pairing == "released_code":
        m = item % n_refs
        return m, m % n_prompts, m % n_neg
    total = n_prompts * n_neg
    epoch, pos = divmod(item, total)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(derived_seed(seed, 7, epoch))).tolist()
    combo = perm[pos]
    return pos % n_refs, combo % n_prompts, combo // n_prompts


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """ε for ε-prediction models, v = √ᾱ·ε − √(1−ᾱ)·x₀ for v-prediction ones (SD 2.x), as the scheduler defines it."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise GenrewardError(f"RPO supports epsilon and v_prediction models, not prediction_type={kind!r}")


def noised_errors(unet, scheduler, latents, noise, timesteps, text_embeds) -> torch.Tensor:
    """Per-image e(x) = mean ‖target − unet(x_t, t, c)‖² for a batch of (already independent) noise/timestep draws."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(scheduler, latents, noise, timesteps)
    pred = unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=text_embeds.to(unet.dtype)).sample
    return per_image_mse(pred, target)


# --------------------------------------------------------------------------------------------- train


def train(config: RPOConfig) -> dict:
    """Run RPO; returns the best step, validation numbers and evaluation summaries (also in metrics.jsonl)."""
    from genreward.dreambench import image_files, load_reference_images, resolve_subject_folder

    r, subj = config.rpo, config.subject
    if subj.references == "???":
        raise GenrewardError("subject.references: missing required value (a folder of the subject's photos, or skimage:NAME)")
    if config.reward.name != "lambda_harmonic":
        raise GenrewardError(f"reward.name: RPO uses the lambda_harmonic reward, got {config.reward.name!r}")
    if not subj.references.startswith("skimage:"):
        image_files(subj.references)  # fail fast, before any model loads, on a missing or empty subject folder
    run = TrainingRun(config, need_reference=True, unit="step", train_mode=True, families=("sd",))  # dropout acts in the denoising loss
    acc, pipe, out = run.accelerator, run.pipe, run.output_dir
    device, scheduler = acc.device, pipe.scheduler
    resolution = r.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    check_identifier(pipe.tokenizer, subj.identifier)
    reference_digest = param_digest(frozen_parameters(run))  # ε_ref must stay bit-identical (§11.7)

    # -- subject, prompts, reward views ---------------------------------------------------------------
    ref_folder = resolve_subject_folder(subj.references, out) if acc.is_main_process else None
    acc.wait_for_everyone()
    ref_folder = resolve_subject_folder(subj.references, out) if ref_folder is None else ref_folder
    references = load_reference_images(ref_folder, size=resolution).to(device)  # [M,3,S,S] in [0,1]
    n_refs = references.shape[0]
    instance_prompt = fill(r.instance_prompt, subj)
    templates = r.training_prompts or (LIVE_TRAINING_PROMPTS if is_live(subj) else OBJECT_TRAINING_PROMPTS)
    train_prompts = [fill(t, subj) for t in templates]
    val_prompts = [fill(t, subj) for t in r.validation_prompts] if r.validation_prompts else list(train_prompts)
    reward = build_from_spec(RewardSpec(name="lambda_harmonic", options={**config.reward.options, "lam": r.lambda_train}))
    if not isinstance(reward, LambdaHarmonic):
        raise GenrewardError("reward: RPO needs the lambda_harmonic reward")
    reward.set_references(references)
    label_reward = reward.view(r.lambda_train, [subj.identifier] if r.label_reward_prompt == "remove_identifier" else [])
    val_rewards = [
        reward.view(r.lambda_val, [subj.identifier], name="lambda_harmonic"),
        reward.view(1.0, [subj.identifier], name="image_similarity"),  # R_1 = S_I exactly
        reward.view(0.0, [subj.identifier], name="text_similarity"),  # R_0 = S_T exactly
    ]
    with torch.no_grad():
        embed = lambda texts: pipe.encode_prompt(list(texts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)[0]  # noqa: E731
        inst_emb = embed([instance_prompt])  # [1,L,D]
        prompt_emb = embed(train_prompts)  # [K,L,D]

    # -- 1. negatives from the frozen model, once (PNG on disk, as the released code; reused on resume) --------
    negatives = generate_negatives(run, train_prompts, r.negatives_per_prompt, resolution, config)  # [K,n,3,S,S]
    K, n_neg = negatives.shape[:2]

    # -- label rewards R_λtrain(·, p_k) of every reference and every negative (images fixed ⇒ computed once) ---
    with torch.no_grad():
        ref_rewards = torch.stack([
            label_reward(references, [p] * n_refs).scores.to(device) for p in train_prompts
        ], dim=1)  # [M,K]
        neg_rewards = torch.stack([
            label_reward(negatives[k], [train_prompts[k]] * n_neg).scores.to(device) for k in range(K)
        ])  # [K,n]
        # q(z | image) of every training image, encoded once: a latent is drawn from it at every use.
        ref_mean, ref_std = encode_images(pipe, references, config.sample.batch_size)
        neg_mean, neg_std = encode_images(pipe, negatives.flatten(0, 1), config.sample.batch_size)
        neg_mean, neg_std = neg_mean.view(K, n_neg, *ref_mean.shape[1:]), neg_std.view(K, n_neg, *ref_mean.shape[1:])
        # The references as this pipeline's VAE renders them: the closest any sample can get. With a random-weight
        # VAE (tiny:sd) they differ a lot from the photos, so similarity to them shows what the U-Net learned.
        rendered = decode_latents(pipe, ref_mean * pipe.vae.config.scaling_factor)
    vae_view = reward.view(1.0, [subj.identifier], name="vae_image_similarity")
    vae_view.set_references(rendered)
    val_rewards.append(vae_view)
    sf = pipe.vae.config.scaling_factor
    if acc.is_main_process:
        (out / "label_rewards.json").write_text(json.dumps({
            "lambda_train": r.lambda_train, "prompts": train_prompts,
            "references": ref_rewards.cpu().tolist(), "negatives": neg_rewards.cpu().tolist(),
        }) + "\n")

    # -- validation / model selection state (restored on resume) -------------------------------------------
    state = {"history": [], "best_step": None, "best_value": None}
    state.update({k: run.resume_state[k] for k in ("history", "best_step", "best_value") if k in run.resume_state})
    val_items = [PromptItem(p, {"subject": subj.class_noun}) for p in val_prompts]
    if run.start == 0:
        before = validate(run, config, val_items, val_rewards, "step-00000")
        run.log_metrics({"step": 0, **{f"val_{k}": v for k, v in before.items()}, "val_lambda": r.lambda_val})

    world, rank = acc.num_processes, acc.process_index
    progress = training_progress(acc, run.start, r.max_train_steps, unit="step")
    for step in range(run.start, r.max_train_steps):
        timer = Timer()
        gen = torch.Generator().manual_seed(derived_seed(config.train.seed, 3, step, rank))
        items = [step * r.batch_size * world + rank * r.batch_size + b for b in range(r.batch_size)]
        idx = [pair_indices(i, r.pairing, n_refs, K, n_neg, config.train.seed) for i in items]
        m_i = torch.tensor([m for m, _, _ in idx], device=device)
        k_i = torch.tensor([k for _, k, _ in idx], device=device)
        j_i = torch.tensor([j for _, _, j in idx], device=device)
        with timer("data"):
            # 2a. labels y ~ Bernoulli(σ(R(r, p_k) − R(g, p_k))), drawn afresh every time a pair is used.
            prob = bradley_terry_probability(ref_rewards[m_i, k_i], neg_rewards[k_i, j_i])
            labels = sample_preference_labels(prob, gen)
            # 2b. latents x ~ q(z|image) and independent (t, ε) for the reference and the negative image.
            B = len(items)
            shape = ref_mean.shape[1:]
            eps_lat = torch.randn((2 * B, *shape), generator=gen).to(device)
            x_r = (ref_mean[m_i] + ref_std[m_i] * eps_lat[:B]) * sf
            x_g = (neg_mean[k_i, j_i] + neg_std[k_i, j_i] * eps_lat[B:]) * sf
            latents = torch.cat([x_r, x_g])
            noise = torch.randn(latents.shape, generator=gen).to(device)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (2 * B,), generator=gen).to(device)
            text = torch.cat([inst_emb.expand(B, -1, -1), prompt_emb[k_i]])
        with timer("training"):
            with acc.autocast():
                err_policy = noised_errors(run.unet, scheduler, latents, noise, timesteps, text)
                with torch.no_grad(), run.reference() as ref_unet:
                    err_frozen = noised_errors(ref_unet, scheduler, latents, noise, timesteps, text)
            loss, stats = rpo_loss(
                err_policy[:B], err_frozen[:B], err_policy[B:], err_frozen[B:], labels,
                beta=r.beta, preference_weight=r.preference_weight, similarity_weight=r.similarity_weight,
            )
            acc.backward(loss)
            grad_norm = run.optimizer_step()
        fault_point("unit")
        record = {"step": step + 1, **{k: float(acc.gather(v.reshape(1)).mean()) for k, v in stats.items()}}
        record.update(label_prob=float(prob.mean()), grad_norm=grad_norm, lr=config.train.optim.lr, peak_rss_mb=peak_rss_mb())
        record.update({f"time_{k}": round(v, 4) for k, v in timer.seconds.items()})
        done = step + 1
        if done % r.validation_every == 0 or done == r.max_train_steps:
            # 3. validation with λ_val and keep-best model selection.
            val = validate(run, config, val_items, val_rewards, f"step-{done:05d}")
            record.update({f"val_{k}": v for k, v in val.items()}, val_lambda=r.lambda_val)
            state["history"].append([done, val["lambda_harmonic"]])
            best = select_best(state["history"])
            if best is not None and best[0] == done:
                state["best_step"], state["best_value"] = done, best[1]
                save_best(run, done, val)
            record["best_step"] = state["best_step"]
            run.log_metrics(record)
            run.save_checkpoint(done, extra=state)
        else:
            run.log_metrics(record)
            if run.run_dir.due(done, r.max_train_steps):
                run.save_checkpoint(done, extra=state)
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}", best=state["best_step"])
        run.check_stop(done, extra=state)
    progress.close()
    result = finish(run, config, state, references, ref_folder)
    result["reference_unchanged"] = param_digest(frozen_parameters(run)) == reference_digest
    return result


def frozen_parameters(run: TrainingRun) -> list[torch.Tensor]:
    """The parameters of ε_ref: the frozen copy (full fine-tuning) or the U-Net's base weights under the LoRA adapters."""
    if run.reference_unet is not None:
        return list(run.reference_unet.parameters())
    return [p for name, p in run.policy.named_parameters() if "lora_" not in name]


def generate_negatives(run: TrainingRun, prompts: list[str], per_prompt: int, resolution: int, config: RPOConfig) -> torch.Tensor:
    """``per_prompt`` images per novel prompt from the frozen model → ``[K,n,3,S,S]`` (saved as negatives/pKK_sJJ.png).

    Read back from the PNGs (as the released code does), so fresh and resumed runs train on identical pixels.
    """
    acc = run.accelerator
    folder = run.output_dir / "negatives"
    paths = [[folder / f"p{k:02d}_s{j:02d}.png" for j in range(per_prompt)] for k in range(len(prompts))]
    if acc.is_main_process and not all(p.is_file() for row in paths for p in row):
        flat = [p for p in prompts for _ in range(per_prompt)]
        seeds = [derived_seed(config.train.seed, 1, k, j) for k in range(len(prompts)) for j in range(per_prompt)]
        with torch.no_grad(), run.reference() as frozen:
            traj = run.sample(flat, seeds, model=frozen, height=resolution, width=resolution, progress=True)
        for n, path in enumerate(p for row in paths for p in row):
            save_png(traj.images[n], path)
        (folder / "prompts.json").write_text(json.dumps({"prompts": prompts, "per_prompt": per_prompt}, indent=2) + "\n")
    acc.wait_for_everyone()
    images = load_images([p for row in paths for p in row]).to(acc.device)
    return images.view(len(prompts), per_prompt, *images.shape[1:])


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior q(z | image) of images in [0,1] → (mean, std) in fp32, encoded in chunks to bound memory."""
    vae = pipe.vae
    means, stds = [], []
    for start in range(0, images.shape[0], batch_size):
        dist = vae.encode(images[start : start + batch_size].mul(2).sub(1).to(vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def validate(run: TrainingRun, config: RPOConfig, items: list[PromptItem], rewards: list, tag: str) -> dict[str, float]:
    """Mean λ_val-Harmonic, S_I and S_T of ``num_validation_images`` per validation prompt (fixed seeds) → dict."""
    from genreward.evaluation import evaluate
    from genreward.gallery import write_gallery

    acc, r = run.accelerator, config.rpo
    summary: dict[str, float] = {}
    if acc.is_main_process:
        res = r.resolution or run.pipe.unet.config.sample_size * run.pipe.vae_scale_factor
        sample = SampleConfig(**{**vars(config.sample), "height": res, "width": res})
        policy = run.policy
        was_training = policy.training
        policy.eval()
        folder = run.output_dir / "validation" / tag
        with acc.autocast():
            result = evaluate(run.pipe, items, rewards, folder, sample, images_per_prompt=r.num_validation_images,
                              seed=r.validation_seed, unet=policy, progress=False)
        policy.train(was_training)
        write_gallery(folder, title=f"RPO validation {tag}")
        summary = {k: float(v) for k, v in result.summary.items()}
    from accelerate.utils import broadcast_object_list

    box = [summary]
    broadcast_object_list(box)
    return box[0]


def save_best(run: TrainingRun, step: int, val: dict[str, float]) -> None:
    """The selected model: weights in diffusers format under ``best/`` (+ best.json), replaced when beaten."""
    if run.accelerator.is_main_process:
        folder = run.output_dir / "best"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        save_unet_weights(run.policy, folder, run.train_cfg.trainable)
        (folder / "best.json").write_text(json.dumps({"step": step, **{f"val_{k}": v for k, v in val.items()}}) + "\n")
    run.accelerator.wait_for_everyone()


def finish(run: TrainingRun, config: RPOConfig, state: dict, references: torch.Tensor, ref_folder: Path) -> dict:
    """Replica check, validation curve, galleries, and DreamBench evaluation of the base and the best model."""
    from genreward.gallery import write_gallery

    acc = run.accelerator
    out: dict = {"best_step": state["best_step"], "best_val_lambda_harmonic": state["best_value"]}
    out["replicas_identical"] = run.check_replicas()
    if acc.is_main_process:
        rows = [json.loads(line) for line in run.metrics_path.read_text().splitlines()] if run.metrics_path.exists() else []
        first = next((row for row in rows if row.get("step") == 0 and "val_lambda_harmonic" in row), None)
        best_row = next((row for row in rows if row.get("step") == state["best_step"] and "val_lambda_harmonic" in row), None)
        val_keys = lambda row: {k[4:]: v for k, v in row.items() if k.startswith("val_") and k != "val_lambda"}  # noqa: E731
        if first:
            out["before"] = val_keys(first)
        if best_row:
            out["best"] = val_keys(best_row)
        last_row = next((row for row in reversed(rows) if "val_lambda_harmonic" in row), None)
        if last_row:
            out["last"] = {"step": last_row["step"], **val_keys(last_row)}
        plot_reward_curve(run.metrics_path, run.output_dir / "validation_curve.png", key="val_lambda_harmonic")
        vals = run.output_dir / "validation"
        best_dir = vals / f"step-{state['best_step']:05d}" if state["best_step"] is not None else None
        if best_dir is not None and best_dir.is_dir():
            base = vals / "step-00000"
            out["gallery"] = str(write_gallery(best_dir, compare_dir=base if base.is_dir() else None,
                                               out_path=run.output_dir / "gallery.html",
                                               title=f"RPO: base (before) vs best step {state['best_step']} (after)"))
        if config.eval.enabled and state["best_step"] is not None:
            out["eval"] = dreambench_eval(run, config, references, ref_folder)
    acc.wait_for_everyone()
    if acc.is_main_process:
        (run.output_dir / "result.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    acc.end_training()
    return out


def dreambench_eval(run: TrainingRun, config: RPOConfig, references: torch.Tensor, ref_folder: Path) -> dict:
    """DINO / CLIP-I / CLIP-T on the subject's DreamBench prompts for the base model and the best checkpoint."""
    from genreward.dreambench import Subject, aggregate, evaluate_subject, load_metrics_models, write_subject_gallery, write_tables
    from genreward.dreambench import LIVE_PROMPTS, OBJECT_PROMPTS

    e, subj, r = config.eval, config.subject, config.rpo
    res = r.resolution or run.pipe.unet.config.sample_size * run.pipe.vae_scale_factor
    sample = SampleConfig(**{**vars(config.sample), "height": res, "width": res})
    metrics = load_metrics_models(e.dino_model, e.clip_model, subj.identifier, device=run.accelerator.device)
    subject = Subject("subject", Path(ref_folder), subj.class_noun, is_live(subj), LIVE_PROMPTS if is_live(subj) else OBJECT_PROMPTS)
    policy = run.policy
    load_unet_weights(policy, run.output_dir / "best", run.train_cfg.trainable)
    policy.eval()
    results = {}
    variants = [("base", True), ("best", False)] if e.compare_base else [("best", False)]
    table = ["| model | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|"]
    for tag, use_base in variants:
        folder = run.output_dir / "eval" / tag
        with torch.no_grad(), run.accelerator.autocast():
            if use_base:
                with run.reference() as frozen:
                    recs = evaluate_subject(subject, metrics, folder / subject.name, subj.identifier, e.images_per_prompt,
                                            e.prompts_limit, pipe=run.pipe, sample=sample, seed=e.seed, unet=frozen,
                                            references=references)
            else:
                recs = evaluate_subject(subject, metrics, folder / subject.name, subj.identifier, e.images_per_prompt,
                                        e.prompts_limit, pipe=run.pipe, sample=sample, seed=e.seed, unet=policy,
                                        references=references)
        prompt_rows, subject_rows, overall = aggregate({subject.name: recs})
        write_tables(folder, prompt_rows, subject_rows, overall, f"DINO: {e.dino_model} · CLIP: {e.clip_model}")
        write_subject_gallery(folder, {subject.name: recs}, {subject.name: subject}, f"RPO {tag}: references vs generated")
        results[tag] = overall
        label = tag if tag == "base" else f"best (step {run_best_step(run)})"
        table.append(f"| {label} | " + " | ".join(f"{overall[m]:.4f}" for m in ("dino", "clip_i", "clip_t")) + " |")
    (run.output_dir / "eval" / "summary.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    results["table"] = str(run.output_dir / "eval" / "summary.md")
    return results


def run_best_step(run: TrainingRun) -> int | None:
    path = run.output_dir / "best" / "best.json"
    return json.loads(path.read_text())["step"] if path.is_file() else None
