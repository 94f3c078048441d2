"""Structured derivatives for a pure JAX function (for neural-tangents users on current JAX).

``torchntk.bridge.structured_ntk_fn`` takes ``f(params, x)`` with pytree params and returns ``ntk_fn(x1, x2,
params)`` with neural-tangents' kernel shapes (but ``trace_axes=()`` by default; traced axes are averaged).

Run: ``python examples/jax_function.py``
"""

import jax
import jax.numpy as jnp

from torchntk.bridge import structured_ntk_fn


def mlp(params: dict, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"]


def main() -> None:
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        "w1": jax.random.normal(k1, (16, 64)) / 4,
        "b1": jnp.zeros(64),
        "w2": jax.random.normal(k2, (64, 5)) / 8,
    }
    x1, x2 = jax.random.normal(k3, (8, 16)), jax.random.normal(k4, (3, 16))
    ntk_fn = structured_ntk_fn(mlp)
    print(ntk_fn(x1, x2, params).shape)  # (8, 3, 5, 5)
    print(structured_ntk_fn(mlp, trace_axes=(-1,))(x1, None, params).shape)  # (8, 8)


if __name__ == "__main__":
    main()
