"""Diffusion-DPO loss (Wallace et al. 2023) as PPD uses it, its metrics, and a plain SFT loss.

For a pair (c, x0+, x0-) with one timestep t ~ U{0..T-1} and one noise eps ~ N(0, I) shared by both
images (x_t = alpha_t x0 + sigma_t eps), let the per-sample squared errors be

    e_theta(x0) = reduce( (target - eps_theta(x_t, c, u, t))^2 )      policy: user branch on
    e_ref(x0)   = reduce( (target - eps_ref(x_t, c, t))^2 )            reference: user branch off

where `reduce` is the mean over the D elements of a sample ("mean", Diffusion-DPO's code) or their
sum ("sum", the paper's ||.||^2), and target is eps or v. Then

    z = -0.5 * beta * [ (e_theta(x0+) - e_ref(x0+)) - (e_theta(x0-) - e_ref(x0-)) ]
    L = -log sigmoid(z)                                    averaged over the pairs of the batch.

Convention and mapping. The paper's loss is -log sigmoid(-beta_p T w(lambda_t) [...]) with sum
squared errors; the constant T w(lambda_t) is folded into beta. Our beta relates to it by

    beta (reduction="sum")  = 2 T w(lambda_t) beta_p
    beta (reduction="mean") = 2 T w(lambda_t) beta_p * D

Diffusion-DPO's released setting for SD 1.5 and SDXL is reduction="mean", beta=5000 (its code
computes exactly z above). The PPD paper tunes beta in [0.1, 2] without stating its reduction; one
reading is reduction="sum" with a small beta, for which `reduction="mean", beta = D * beta_sum`
is the same loss (D = 4*64*64 = 16384 for SD 1.5 latents at 512 px).

At initialisation the user branch is the identity (zero value projection), so e_theta == e_ref,
z = 0 and L = log 2 exactly.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class DPOTerms(NamedTuple):
  """Per-pair quantities, each of shape [B]."""
  loss: jax.Array
  z: jax.Array                  # the logit inside -log sigmoid: the implicit reward margin
  policy_diff: jax.Array        # e_theta(x0+) - e_theta(x0-)
  reference_diff: jax.Array     # e_ref(x0+) - e_ref(x0-)


def squared_error(target: jax.Array, prediction: jax.Array, reduction: str = "mean") -> jax.Array:
  """Per-sample squared error [B, ...] -> [B], in float32 whatever the compute dtype."""
  err = jnp.square(target.astype(jnp.float32) - prediction.astype(jnp.float32))
  err = err.reshape(err.shape[0], -1)
  if reduction == "mean":
    return err.mean(axis=1)
  if reduction == "sum":
    return err.sum(axis=1)
  raise ValueError(f"dpo.reduction must be 'mean' or 'sum', got {reduction!r}")


def dpo_terms(policy_err_w: jax.Array, policy_err_l: jax.Array, ref_err_w: jax.Array,
              ref_err_l: jax.Array, beta: float, weight: jax.Array | None = None) -> DPOTerms:
  """The loss of each pair from its four per-sample errors (w: preferred, l: dispreferred).

  weight [B]: omega(lambda_t) per pair (None: 1, Diffusion-DPO's choice), z = omega z."""
  policy_diff = policy_err_w - policy_err_l
  reference_diff = ref_err_w - ref_err_l
  z = -0.5 * beta * (policy_diff - reference_diff)
  if weight is not None:
    z = weight * z
  # -log sigmoid(z) = softplus(-z), stable for large |z|.
  return DPOTerms(jax.nn.softplus(-z), z, policy_diff, reference_diff)


def implicit_accuracy(z: jax.Array) -> jax.Array:
  """Fraction of pairs whose implicit reward ranks the preferred image first, a tie (z == 0,
  e.g. every pair at initialisation) counting half, as Diffusion-DPO's training code does:
  acc = mean(1[z > 0] + 0.5 * 1[z == 0])."""
  z = z.astype(jnp.float32)
  return (jnp.where(z > 0, 1.0, 0.0) + jnp.where(z == 0, 0.5, 0.0)).mean()


def dpo_metrics(terms: DPOTerms, policy_err_w, policy_err_l, ref_err_w, ref_err_l) -> dict:
  """Batch means of the quantities people plot during DPO training."""
  return {
      "loss": terms.loss.mean(),
      "implicit_accuracy": implicit_accuracy(terms.z),
      "reward_margin": terms.z.mean(),
      "policy_diff": terms.policy_diff.mean(),
      "reference_diff": terms.reference_diff.mean(),
      "policy_err_preferred": policy_err_w.mean(),
      "policy_err_dispreferred": policy_err_l.mean(),
      "reference_err_preferred": ref_err_w.mean(),
      "reference_err_dispreferred": ref_err_l.mean(),
  }


def sft_metrics(policy_err_w: jax.Array) -> dict:
  """SFT baseline: L = mean e_theta(x0+), the usual diffusion loss on preferred images only."""
  return {"loss": policy_err_w.mean(), "policy_err_preferred": policy_err_w.mean()}
