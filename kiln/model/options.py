"""How a build runs (as opposed to what it builds, which is the ImageSpec)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BuildOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str = Field(default="output", description="directory for the images, manifest.json and SHA256SUMS")
    elements_path: list[str] = Field(default_factory=list, description="extra element directories, searched first")
    cache: str | None = Field(default=None, description="the layer and artifact store (default: KILN_CACHE)")
    no_cache: bool = Field(default=False, description="rebuild every step, replacing cached entries")
    boot_test: bool = Field(default=True, description="boot the image under QEMU before calling it done")
    publish: bool = Field(default=True, description="publish to the spec's publish targets (Glance, S3)")
    only_changed: bool = Field(default=False, description="publish only where the stable image lacks this build's "
                               "content (packages, elements, spec), with a package diff (the nightly refresh)")
    dib_elements: bool = Field(default=False, description="search the installed diskimage-builder's elements too")
    checksum_files: bool = Field(default=False, description="write <image>.md5 and <image>.sha256 (DIB --checksum)")
    break_at: str | None = Field(default=None, description="drop into a shell: before-<phase>, after-<phase>, "
                                                           "after-error (DIB's break=)")
    plan_ref: str | None = Field(default=None, description="the plan `kiln build` made before starting the flow, "
                                 "kept in this process (kiln.build.plan.hand_over); internal")
