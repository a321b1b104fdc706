package coap

import "time"

// SetAcceptTimeout bounds s's confirmable requests' wait for the Sink (the
// acceptTimeout constant otherwise), for tests of the deadline; call it
// before Run.
func SetAcceptTimeout(s *Server, d time.Duration) { s.deadline.Timeout = d }
