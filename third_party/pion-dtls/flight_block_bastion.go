// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package dtls

import (
	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// flightBlockSize is how many packets a flightBlock holds: a PSK server's
// flight 4 (ServerHello, ServerKeyExchange, ServerHelloDone) and flight 6
// (ChangeCipherSpec, Finished) fit; a certificate flight 4 may take more,
// which are then made one by one as before.
const flightBlockSize = 3

// flightBlock holds the packets of one flight being generated, each with
// its record and handshake message wrapper, in one allocation instead of
// three per packet (Bastion patch (49), third_party/README.md). The
// packets are what the generators made before: a record with version
// DTLS 1.2 and the given content. The block lives as long as any of its
// packets (the flight is kept for retransmission until the next one).
type flightBlock struct {
	pkts [flightBlockSize]packet
	recs [flightBlockSize]recordlayer.RecordLayer
	hss  [flightBlockSize]handshake.Handshake
	n    int
}

// record returns a new packet whose record has version DTLS 1.2 and
// content; the caller sets the rest.
func (b *flightBlock) record(content protocol.Content) *packet {
	if b == nil || b.n == flightBlockSize {
		return &packet{record: &recordlayer.RecordLayer{
			Header:  recordlayer.Header{Version: protocol.Version1_2},
			Content: content,
		}}
	}
	i := b.n
	b.n++
	b.recs[i] = recordlayer.RecordLayer{
		Header:  recordlayer.Header{Version: protocol.Version1_2},
		Content: content,
	}
	b.pkts[i] = packet{record: &b.recs[i]}

	return &b.pkts[i]
}

// handshake returns a new packet carrying msg in a handshake record.
func (b *flightBlock) handshake(msg handshake.Message) *packet {
	if b == nil || b.n == flightBlockSize {
		return b.record(&handshake.Handshake{Message: msg})
	}
	b.hss[b.n] = handshake.Handshake{Message: msg}

	return b.record(&b.hss[b.n])
}
