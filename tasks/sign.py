"""Stage `sign`, Prefect face: the task and its summary artifact of what signs what.
The stage itself is :mod:`gantry.stages.sign`."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from gantry.spec import ReleaseSpec
from gantry.stages import sign
from gantry.stages.build import BuildResult
from gantry.stages.scan import ScanResult
from gantry.stages.sign import SignResult
from gantry.stages.weights import WeightsResult
from tasks._retry import retry_transient


@task(name="sign", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_transient)
def sign_task(
    spec: ReleaseSpec, build: BuildResult, scan: ScanResult, weights: WeightsResult
) -> SignResult:
    """Prefect task for stage `sign`; leaves a summary artifact of what signs what."""
    from gantry.settings import get_settings

    result = sign.run(spec, build, scan, weights, get_settings())
    create_markdown_artifact(
        key=f"{spec.name}-signatures",
        markdown="\n".join(
            [
                f"**Image** `{result.image}` signed by `{result.signer}` "
                f"(verify with `{result.public_key}`), stored at `{result.signature_ref}`",
                "",
                *[f"- attestation `{k}`: `{v}`" for k, v in result.attestations.items()],
                "",
                f"**Weights** signed with key `{result.weights_key_fingerprint}`: "
                f"`{result.weights_signature}`",
            ]
        ),
        description=json.dumps({"cached": result.cached}),
    )
    return result
