"""The ML2 mechanism driver of kiln's single-node OpenStack (infra/openstack).

It binds every port on a flat network of the configured physical network as a plain tap device
(`binding:vif_type tap`): Nova's libvirt driver then creates `tap<port id>` on the compute host and
QEMU attaches the guest's NIC to it. No L2 agent runs; the stack's `guestnet` daemon moves each such
tap, once QEMU holds it, into the guest network's namespace, which nothing of the host's is in.
The port is ACTIVE as soon as it is bound: there is no agent to report it up, and Nova is configured
not to wait for one (`vif_plugging_timeout = 0`).
"""

from __future__ import annotations

import logging
from typing import Any

from neutron_lib import constants
from neutron_lib.api.definitions import portbindings
from neutron_lib.plugins.ml2 import api
from oslo_config import cfg

LOG = logging.getLogger(__name__)

OPTS = [cfg.ListOpt("physical_networks", default=["kiln-guests"],
                    help="The flat physical networks whose ports are bound as tap devices.")]
cfg.CONF.register_opts(OPTS, "ml2_kiln_tap")


class TapMechanismDriver(api.MechanismDriver):
    """Binds ports on the configured flat physical networks with vif_type `tap` on any host."""

    def initialize(self) -> None:
        self.physnets = set(cfg.CONF.ml2_kiln_tap.physical_networks)
        LOG.info("kiln_tap: binding ports on physical networks %s as tap devices", sorted(self.physnets))

    @property
    def connectivity(self) -> str:
        return portbindings.CONNECTIVITY_L2

    def bind_port(self, context: Any) -> None:
        if context.current.get(portbindings.VNIC_TYPE, portbindings.VNIC_NORMAL) != portbindings.VNIC_NORMAL:
            return
        for segment in context.segments_to_bind:
            if (segment[api.NETWORK_TYPE] == constants.TYPE_FLAT
                    and segment[api.PHYSICAL_NETWORK] in self.physnets):
                context.set_binding(segment[api.ID], portbindings.VIF_TYPE_TAP,
                                    {portbindings.CAP_PORT_FILTER: False}, status=constants.PORT_STATUS_ACTIVE)
                LOG.info("kiln_tap: bound port %s on host %s as a tap device", context.current["id"], context.host)
                return
