//! What one client's negotiation settled, which the transmission phase
//! and the export's flags then follow.

/// What the client chose during negotiation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Session {
    /// The server lets several clients share the export (`-e` above 1),
    /// so it offers `NBD_FLAG_CAN_MULTI_CONN` as qemu-nbd does: a client
    /// such as nbdcopy then opens several connections, which a server
    /// taking one at a time would leave waiting.
    pub(crate) multi_conn: bool,
    /// Structured replies were negotiated.
    pub(crate) structured: bool,
    /// The metadata contexts selected, by id (block status may be asked
    /// for when there is one), in id order.
    pub(crate) contexts: Vec<(u32, MetaContext)>,
}

/// One metadata context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MetaContext {
    /// Holes and zeros.
    BaseAllocation,
    /// Which layer of the backing chain holds each range (0: none).
    AllocationDepth,
    /// The granules a persistent bitmap marks dirty.
    DirtyBitmap(String),
}

impl MetaContext {
    /// Its name on the wire.
    pub(crate) fn name(&self) -> String {
        match self {
            Self::BaseAllocation => "base:allocation".into(),
            Self::AllocationDepth => "qemu:allocation-depth".into(),
            Self::DirtyBitmap(name) => format!("qemu:dirty-bitmap:{name}"),
        }
    }
}
