"""convert: one task per output format."""

from __future__ import annotations

from prefect import task

from kiln.build.customize import BuildContext
from kiln.image.convert import ImageOutput, convert_key, converted
from kiln.image.pack import PackOutput
from tasks.common import store_key


@task(name="convert", task_run_name="convert {fmt}", persist_result=True,
      cache_key_fn=store_key(lambda p: (p["ctx"], [convert_key(p["packed"].key, p["fmt"],
                                                                p["ctx"].plan.spec.compression,
                                                                p["ctx"].plan.spec.qemu_img_options)])))
def convert_image(ctx: BuildContext, packed: PackOutput, fmt: str) -> ImageOutput:
    spec = ctx.plan.spec
    return converted(ctx.store, packed.raw, packed.key, fmt, name=spec.name, compression=spec.compression,
                     options=spec.qemu_img_options, rebuild=ctx.rebuild)[0]
