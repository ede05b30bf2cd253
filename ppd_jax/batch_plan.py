"""How the global batch divides over devices and accumulation micro-steps, checked before any work.

    batch_size = devices x micro-batch x grad_accum_steps

Every device holds batch_size / devices pairs of a step and takes them in grad_accum_steps equal
micro-batches (step.make_grad_fn keeps each device's rows on it). A batch that does not divide
would fail inside jit after model init (IndivisibleError), or silently duplicate rows across
devices; it is refused here instead, naming the fields, the device count and values that divide.

config.per_device_batch = P > 0 is the most pairs one device takes in a micro-step (what fits its
memory): accumulation follows as the fewest micro-steps whose equal micro-batches hold at most P
pairs, so one config runs on 1, 2, 4 or 8 devices. P = 0 takes grad_accum_steps as given.
Accumulation does not change what a step computes (the gradient of the mean over the global
batch), so a resume may change it (checkpoint._MAY_DIFFER).
"""
import ml_collections

from ppd_jax.config_validation import ConfigError


def fewest_micro_steps(per_device: int, most: int) -> int:
  """The smallest A dividing `per_device` with per_device / A <= most (A = per_device always
  qualifies: one pair per micro-step)."""
  steps = -(-per_device // most)
  while per_device % steps:
    steps += 1
  return steps


def _multiples_near(n: int, k: int) -> str:
  """Multiples of k next to n, for a message: "8 or 16"."""
  low, high = (n // k) * k, (n // k + 1) * k
  return f"{low} or {high}" if low else f"{high}"


def _divisors(n: int) -> str:
  return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def resolve(c: ml_collections.ConfigDict, devices: int) -> str:
  """Sets c.grad_accum_steps for `devices` (the batch is split over every device of the mesh)
  or raises ConfigError; returns the split as a line for the log."""
  batch, accum = c.batch_size, c.grad_accum_steps
  most = c.get("per_device_batch", 0)
  if batch % devices:
    raise ConfigError(
        f"config.batch_size={batch} does not divide over the {devices} devices: every device "
        f"takes an equal share; use batch_size={_multiples_near(batch, devices)}")
  per_device = batch // devices
  if most:
    derived = fewest_micro_steps(per_device, most)
    if accum not in (1, derived):
      raise ConfigError(
          f"config.grad_accum_steps={accum}: with config.per_device_batch={most} it follows "
          f"from the batch ({derived} for batch_size={batch} on {devices} devices); set "
          "per_device_batch=0 to choose grad_accum_steps by hand")
    accum = c.grad_accum_steps = derived
  elif per_device % accum:
    raise ConfigError(
        f"config.batch_size={batch} on {devices} devices is {per_device} pairs per device, "
        f"which config.grad_accum_steps={accum} equal micro-batches do not divide: use "
        f"batch_size={_multiples_near(batch, devices * accum)}, grad_accum_steps one of "
        f"{_divisors(per_device)}, or config.per_device_batch=N (at most N pairs per device "
        "per micro-step) to derive it")
  plural = lambda n, word: f"{n} {word}" + ("s" if n != 1 else "")
  return (f"batch {batch} = {plural(devices, 'device')} x {plural(per_device // accum, 'pair')} "
          f"x {plural(accum, 'micro-step')}")
