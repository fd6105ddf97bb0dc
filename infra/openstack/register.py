"""Register projects, users, roles, services and endpoints in one process, then write clouds.yaml.

Run by up.sh with the stack's own venv (openstacksdk comes with python-openstackclient). One process
instead of the CLI because each `openstack` call costs 3-4 s here. Idempotent: everything is
looked up first and created only when missing; passwords are (re)set from secrets.env every run.
Passwords are read from the environment and never printed.

Two phases: `identity` (as soon as Keystone answers: the services authenticate with their users when
they start) and `compute` (once Nova answers: the boot-test flavor).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import openstack
import yaml


def find_or_create(finder: Any, creator: Any, name: str, **attrs: Any) -> Any:
    found = finder(name, ignore_missing=True)
    if found is not None:
        return found
    print(f"creating {name}")
    return creator(name=name, **attrs)


def ensure_endpoints(conn: Any, service: Any, url: str, region: str) -> None:
    existing = {(e.interface, e.url) for e in conn.identity.endpoints(service_id=service.id, region_id=region)}
    for interface in ("public", "internal", "admin"):
        if (interface, url) in existing:
            continue
        for stale in conn.identity.endpoints(service_id=service.id, interface=interface, region_id=region):
            conn.identity.delete_endpoint(stale)
        print(f"endpoint {service.name} {interface} {url}")
        conn.identity.create_endpoint(service_id=service.id, interface=interface, url=url, region_id=region)


def ensure_user(conn: Any, name: str, password: str, project: Any, roles: list[Any], domain: Any) -> Any:
    user = conn.identity.find_user(name, domain_id=domain.id, ignore_missing=True)
    if user is None:
        print(f"creating user {name}")
        user = conn.identity.create_user(name=name, password=password, domain_id=domain.id,
                                         default_project_id=project.id)
    else:
        conn.identity.update_user(user, password=password)
    for role in roles:
        conn.identity.assign_project_role_to_user(project, user, role)
    return user


# the flavor kiln's Nova boot test uses on this stack; clouds.yaml names it (with the network) for kiln
BOOT_FLAVOR = {"name": "kiln.boot", "vcpus": 1, "ram": 1024, "disk": 10}

# the guest network (component guestnet): flat, shared, no DHCP (Nova's config drive carries each guest's
# address); its taps live in a network namespace from which kiln's boot test reaches the guests over SSH
GUEST_NETWORK = os.environ.get("KILN_GUEST_NETWORK", "kiln-guests")
GUEST_NETNS = os.environ.get("KILN_GUEST_NETNS", "kiln-guests")
GUEST_CIDR = os.environ.get("KILN_GUEST_CIDR", "10.254.213.0/24")
GUEST_GATEWAY = os.environ.get("KILN_GUEST_GATEWAY", "10.254.213.1")

# component -> (service user, service name, service type, description, URL argument)
SERVICES = {
    "glance": ("glance", "glance", "image", "OpenStack Image", "glance_url"),
    "placement": ("placement", "placement", "placement", "Placement API", "placement_url"),
    "neutron": ("neutron", "neutron", "network", "OpenStack Networking", "neutron_url"),
    "nova": ("nova", "nova", "compute", "OpenStack Compute", "nova_url"),
}


def clouds_yaml(keystone_url: str, region: str) -> dict[str, Any]:
    def cloud(user: str, password: str, project: str) -> dict[str, Any]:
        return {
            "auth": {"auth_url": keystone_url, "username": user, "password": password, "project_name": project,
                     "user_domain_name": "Default", "project_domain_name": "Default"},
            "region_name": region, "identity_api_version": 3, "interface": "public",
            # read by kiln's Nova boot test (kiln/boot/nova.py): what to boot candidates with on this cloud
            "kiln": {"boot_flavor": BOOT_FLAVOR["name"], "boot_network": "none",
                     "ssh_network": GUEST_NETWORK, "ssh_netns": GUEST_NETNS},
        }

    return {"clouds": {
        "kiln-dev": cloud("kiln", os.environ["KILN_KILN_PASSWORD"], "kiln"),
        "kiln-dev-admin": cloud("admin", os.environ["KILN_ADMIN_PASSWORD"], "admin"),
    }}


def ensure_flavor(conn: Any) -> None:
    """The boot-test flavor, public; recreated when its size changed (flavors are immutable)."""
    flavor = conn.compute.find_flavor(BOOT_FLAVOR["name"], ignore_missing=True)
    if flavor is not None and (flavor.vcpus, flavor.ram, flavor.disk) == (
            BOOT_FLAVOR["vcpus"], BOOT_FLAVOR["ram"], BOOT_FLAVOR["disk"]):
        return
    if flavor is not None:
        conn.compute.delete_flavor(flavor)
    print(f"creating flavor {BOOT_FLAVOR['name']}")
    conn.compute.create_flavor(name=BOOT_FLAVOR["name"], vcpus=BOOT_FLAVOR["vcpus"], ram=BOOT_FLAVOR["ram"],
                               disk=BOOT_FLAVOR["disk"], is_public=True)


def ensure_guest_network(conn: Any) -> None:
    """The guest network and its subnet (a subnet whose range or gateway changed is made anew)."""
    # the network on the guest physical network (only an admin sets provider attributes: a project's own
    # network of the same name is not it)
    net = next(iter(conn.network.networks(provider_physical_network=GUEST_NETWORK)), None)
    if net is None:
        print(f"creating network {GUEST_NETWORK}")
        net = conn.network.create_network(name=GUEST_NETWORK, shared=True, provider_network_type="flat",
                                          provider_physical_network=GUEST_NETWORK)
    for subnet in conn.network.subnets(network_id=net.id):
        if subnet.cidr == GUEST_CIDR and subnet.gateway_ip == GUEST_GATEWAY and not subnet.is_dhcp_enabled:
            return
        print(f"deleting subnet {subnet.id} ({subnet.cidr}): not the guest network's")
        conn.network.delete_subnet(subnet)
    print(f"creating subnet {GUEST_CIDR} on {GUEST_NETWORK}")
    conn.network.create_subnet(name=GUEST_NETWORK, network_id=net.id, ip_version=4, cidr=GUEST_CIDR,
                               gateway_ip=GUEST_GATEWAY, is_dhcp_enabled=False, dns_nameservers=[])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--clouds-yaml", required=True)
    p.add_argument("--keystone-url", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--glance-url")
    p.add_argument("--placement-url")
    p.add_argument("--nova-url")
    p.add_argument("--neutron-url")
    p.add_argument("--phase", choices=["identity", "compute"], default="identity")
    p.add_argument("components", nargs="+")
    args = p.parse_args()
    start = time.monotonic()

    conn = openstack.connect(
        auth_url=args.keystone_url, username="admin", password=os.environ["KILN_ADMIN_PASSWORD"],
        project_name="admin", user_domain_name="Default", project_domain_name="Default",
        region_name=args.region, identity_api_version="3",
    )
    if args.phase == "compute":
        ensure_flavor(conn)
        ensure_guest_network(conn)
        print(f"registered the compute phase in {time.monotonic() - start:.1f} s")
        return 0
    ident = conn.identity
    domain = ident.find_domain("default", ignore_missing=False)
    admin_role = ident.find_role("admin", ignore_missing=False)
    member_role = find_or_create(ident.find_role, ident.create_role, "member")
    reader_role = find_or_create(ident.find_role, ident.create_role, "reader")
    service_project = find_or_create(ident.find_project, ident.create_project, "service", domain_id=domain.id,
                                     description="OpenStack service users")
    kiln_project = find_or_create(ident.find_project, ident.create_project, "kiln", domain_id=domain.id,
                                  description="kiln's images")
    # the operator's publishing account: admin may make images public, list all servers (in-use checks)
    ensure_user(conn, "kiln", os.environ["KILN_KILN_PASSWORD"], kiln_project,
                [admin_role, member_role, reader_role], domain)

    for component, (user, name, kind, description, url_arg) in SERVICES.items():
        if component not in args.components:
            # neither asked for nor running: out of the catalog, so that clients do not call a dead service
            stale = ident.find_service(name, ignore_missing=True)
            if stale is not None:
                print(f"removing service {name} ({kind}) from the catalog: it is not running")
                for endpoint in ident.endpoints(service_id=stale.id):
                    ident.delete_endpoint(endpoint)
                ident.delete_service(stale)
            continue
        password = os.environ[f"KILN_{user.upper()}_SERVICE_PASSWORD"]
        # nova acts as a service towards neutron, placement and glance (service tokens): admin + service
        roles = [admin_role, member_role, reader_role]
        if component == "nova":
            roles.append(find_or_create(ident.find_role, ident.create_role, "service"))
        ensure_user(conn, user, password, service_project, roles, domain)
        service = ident.find_service(name, ignore_missing=True)
        if service is None:
            service = ident.create_service(name=name, type=kind, description=description)
        ensure_endpoints(conn, service, getattr(args, url_arg), args.region)

    data = yaml.safe_dump(clouds_yaml(args.keystone_url, args.region), sort_keys=False)
    tmp = args.clouds_yaml + ".partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)
    os.replace(tmp, args.clouds_yaml)
    print(f"registered {', '.join(args.components)} in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
