# kiln: the two commands of the README are `make image` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
KILN := $(VENV)/bin/kiln
HOST_PACKAGES := mmdebstrap qemu-system-x86 qemu-utils ovmf mtools dosfstools gdisk xorriso \
	cloud-image-utils grub-common grub-pc-bin grub-efi-amd64-bin e2fsprogs zstd util-linux fdisk \
	debian-archive-keyring ca-certificates genisoimage squashfs-tools gpgv gnupg xz-utils xfsprogs btrfs-progs \
	qemu-user-static qemu-system-arm qemu-efi-aarch64 ipxe-qemu arch-test build-essential shellcheck rpm openssh-client
SPEC ?= images/debian-12.yaml

# the suite's temporary tree: pytest empties it at the start of every run, so a run never inherits the
# previous run's images (failed tests keep theirs until then, to be looked at)
TEST_TMP ?= /var/tmp/kiln-test/tmp

TEST_HOST_PACKAGES := chromium chromium-driver fonts-dejavu-core createrepo-c apt-utils iproute2

.PHONY: image test deps venv test-deps lint unit slow serve server-stop clean openstack openstack-down s3 s3-down

## make image: host packages + .venv, then build and boot-test the default image into ./output
image: deps venv
	$(KILN) build $(SPEC)

## make test: everything the tests need, then lint, type checks and the whole suite
test: deps test-deps
	$(MAKE) lint
	$(VENV)/bin/pytest -v --durations=25 --basetemp=$(TEST_TMP) tests

deps:
	@missing=$$(for p in $(HOST_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing host packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip

venv: $(VENV)/bin/python
	$(VENV)/bin/pip install -q -e .

test-deps: $(VENV)/bin/python
	@$(MAKE) --no-print-directory deps HOST_PACKAGES="$(TEST_HOST_PACKAGES)"
	$(VENV)/bin/pip install -q -e '.[test,dib]'

lint:
	$(VENV)/bin/ruff check kiln tasks flows tests benchmarks infra
	$(VENV)/bin/mypy
	shellcheck infra/openstack/*.sh infra/openstack/components/*.sh infra/s3/*.sh infra/prefect/*.sh

## make openstack: the single-node OpenStack on 127.0.0.1 (Keystone, Glance, RabbitMQ, placement, a Neutron API
## server, libvirt/QEMU, Nova); the last line printed is the clouds.yaml path (cloud kiln-dev)
openstack:
	@infra/openstack/up.sh nova

## make openstack-down: stop all of it; nothing of it keeps running (data and venv stay for the next start)
openstack-down:
	@infra/openstack/down.sh

## make s3: an S3 server (moto) on 127.0.0.1:9000
s3:
	infra/s3/up.sh

s3-down:
	infra/s3/down.sh

unit:
	$(VENV)/bin/pytest -q -m 'not slow' tests

## make serve: the local Prefect server, kiln's deployments and a worker; open the UI it prints
serve: deps venv
	$(KILN) serve

server-stop:
	$(KILN) server stop

clean:
	rm -rf output
