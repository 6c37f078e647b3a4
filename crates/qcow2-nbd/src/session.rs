//! What one client's negotiation settled, which the transmission phase
//! and the export's flags then follow.

/// What the client chose during negotiation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Session {
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected (block status may be asked for).
    pub base_allocation: bool,
}
