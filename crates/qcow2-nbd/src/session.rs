//! What one client's negotiation settled, which the transmission phase
//! and the export's flags then follow.

use crate::contexts::MetaContext;

/// What the client chose during negotiation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The metadata contexts selected, by id (block status may be asked
    /// for when there is one), in id order.
    pub contexts: Vec<(u32, MetaContext)>,
}
