"""pack: the layer stack flattened into a bootable raw GPT disk (BIOS and UEFI)."""

from __future__ import annotations

from prefect import task

from kiln.build.customize import BuildContext
from kiln.image.pack import PackOutput, pack, pack_key
from tasks.common import store_key


@task(name="pack", persist_result=True, cache_key_fn=store_key(lambda p: (p["ctx"], [pack_key(p["ctx"])])))
def pack_disk(ctx: BuildContext) -> PackOutput:
    return pack(ctx)[0]
