// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package dtls

import (
	"bytes"
	"context"
	"crypto/fips140"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/dtls/v3/internal/closer"
	dnet "github.com/pion/dtls/v3/internal/net"
	"github.com/pion/dtls/v3/internal/net/udp"
	"github.com/pion/dtls/v3/pkg/crypto/elliptic"
	"github.com/pion/dtls/v3/pkg/crypto/signaturehash"
	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/alert"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
	"github.com/pion/logging"
	"github.com/pion/transport/v5/deadline"
	"github.com/pion/transport/v5/netctx"
	"github.com/pion/transport/v5/replaydetector"
)

const (
	initialTickerInterval = time.Second
	cookieLength          = 20
	sessionLength         = 32
	inboundBufferSize     = 8192
	// Default replay protection window is specified by RFC 6347 Section 4.1.2.6.
	defaultReplayProtectionWindow = 64
	// maxAppDataPacketQueueSize is the maximum number of app data packets we will.
	// enqueue before the handshake is completed.
	maxAppDataPacketQueueSize = 100
	// maxAppDataPacketQueueBytes bounds their bytes (Bastion patch (58)):
	// 100 records of up to 8 KiB, which a peer sends in the next epoch
	// before the keys are there (anyone who knows its address can),
	// held 800 KiB per handshake. A peer's own such records are its
	// ChangeCipherSpec and Finished, under 100 bytes, once per
	// transmission of its flight.
	maxAppDataPacketQueueBytes = 16 << 10
)

func invalidKeyingLabels() map[string]bool {
	return map[string]bool{
		"client finished": true,
		"server finished": true,
		"master secret":   true,
		"key expansion":   true,
	}
}

type addrPkt struct {
	rAddr net.Addr
	data  []byte
}

type recvHandshakeState struct {
	done                    chan struct{}
	isRetransmit            bool
	isClientHelloRetransmit bool
}

// Conn represents a DTLS connection.
type Conn struct {
	lock     sync.RWMutex      // Internal lock (must not be public)
	nextConn netctx.PacketConn // Embedded Conn, typically a udpconn we read/write from
	// waitForDatagram: nextConn is a listener's connection, whose ReadFrom
	// with an empty buffer waits for a datagram without taking it
	// (io.ErrShortBuffer). Bastion patch, see readAndBuffer.
	waitForDatagram bool
	// readsHandshake: handshakeInline's state machine reads on its own
	// goroutine; readAndBuffer leaves a flight's arrival in
	// handshakeRecvd instead of handing it over. handshakeReadFailed: a
	// read error ended that handshake. Bastion patch; only that goroutine
	// uses them, before it starts the record reader.
	readsHandshake      bool
	handshakeRecvd      recvHandshakeState
	handshakeArrived    bool
	handshakeReadFailed bool
	fragmentBuffer      *fragmentBuffer // out-of-order and missing fragment handling
	handshakeCache      *handshakeCache // caching of handshake messages for verifyData generation
	decrypted           chan any        // Decrypted Application Data or error, pull by calling `Read`
	rAddr               net.Addr
	state               State // Internal state

	maximumTransmissionUnit int
	paddingLengthGenerator  func(uint) uint

	handshakeCompletedSuccessfully atomic.Bool
	handshakeMutex                 sync.Mutex
	handshakeDone                  chan struct{}
	writeLock                      sync.Mutex

	encryptedPackets []addrPkt
	encryptedBytes   int // of encryptedPackets' data (Bastion patch (58))

	connectionClosedByUser bool
	closeLock              sync.Mutex
	closed                 *closer.Closer

	// readDeadline and writeDeadline are made when first needed (Bastion
	// patch (47), see lazyDeadline): a Read or SetReadDeadline, a Write or
	// SetWriteDeadline. A server session whose records go to a read
	// handler and that never sets a deadline holds neither.
	readDeadline  atomic.Pointer[deadline.Deadline]
	writeDeadline atomic.Pointer[deadline.Deadline]

	log logging.LeveledLogger

	reading               chan struct{}
	handshakeRecv         chan recvHandshakeState
	cancelHandshaker      func()
	cancelHandshakeReader func()

	fsm *handshakeFSM

	replayProtectionWindow uint

	handshakeConfig *handshakeConfig

	// readHandler, when set, takes application data instead of decrypted;
	// deliverMu keeps its calls in order and never concurrent, and
	// readEnded records that it has had its last call. Bastion patch, see
	// SetReadHandler.
	readHandler atomic.Pointer[func([]byte, error)]
	deliverMu   sync.Mutex
	readEnded   bool

	// helloAgain is this server connection's udp.Replacer when its
	// listener verifies cookies statelessly (Bastion patch (54), see
	// hello_again_bastion.go).
	helloAgain helloReplacer

	// procMu is held, on a listener's connection, by whichever goroutine
	// processes a datagram: the record reader (readAndBuffer) or the
	// listener's read loop (readInline); readCtx is the record reader's
	// context, set under procMu. Bastion patch, see SetInlineReadHandler.
	procMu  sync.Mutex
	readCtx context.Context //nolint:containedctx

	// startReader, on a listener's connection whose handshake has
	// finished, starts its record reader; it is taken (swapped for nil)
	// by the first of: a datagram queued for the reader, Close. Bastion
	// patch (22), see startRecordReader.
	startReader atomic.Pointer[func()]
	// inlineProc: readInline is processing a datagram (patch (26)).
	inlineProc atomic.Bool

	// traces: log may write Tracef lines (Bastion patch, see logTraces).
	traces bool
}

// createConn creates a new DTLS connection.
// Caller is responsible for validating the config before calling this function.
//
//nolint:cyclop
func createConn(
	nextConn net.PacketConn,
	rAddr net.Addr,
	config *Config,
	isClient bool,
	resumeState *State,
) (*Conn, error) {
	if nextConn == nil {
		return nil, errNilNextConn
	}

	loggerFactory := config.LoggerFactory
	if loggerFactory == nil {
		loggerFactory = logging.NewDefaultLoggerFactory()
	}

	logger := loggerFactory.NewLogger("dtls")

	mtu := config.MTU
	if mtu <= 0 {
		mtu = defaultMTU
	}

	replayProtectionWindow := config.ReplayProtectionWindow
	if replayProtectionWindow <= 0 {
		replayProtectionWindow = defaultReplayProtectionWindow
	}

	paddingLengthGenerator := config.PaddingLengthGenerator
	if paddingLengthGenerator == nil {
		paddingLengthGenerator = func(uint) uint { return 0 }
	}

	cipherSuites, err := parseCipherSuites(
		config.CipherSuites,
		config.CustomCipherSuites,
		config.includeCertificateSuites(),
		config.PSK != nil,
	)
	if err != nil {
		return nil, err
	}

	signatureSchemes, err := signaturehash.ParseSignatureSchemes(config.SignatureSchemes, config.InsecureHashes)
	if err != nil {
		return nil, err
	}

	// Parse certificate signature schemes only if explicitly configured
	var certSignatureSchemes []signaturehash.Algorithm
	if len(config.CertificateSignatureSchemes) > 0 {
		certSignatureSchemes, err = signaturehash.ParseSignatureSchemes(
			config.CertificateSignatureSchemes,
			config.InsecureHashes,
		)
		if err != nil {
			return nil, err
		}
	}

	workerInterval := initialTickerInterval
	if config.FlightInterval > 0 {
		workerInterval = config.FlightInterval
	}

	curves := config.EllipticCurves
	if len(curves) == 0 {
		curves = defaultCurves
	}

	if fips140.Enabled() {
		// On FIPS systems, filter out non-approved curves
		filtered := make([]elliptic.Curve, 0, len(curves))
		for _, c := range curves {
			if c != elliptic.X25519 {
				filtered = append(filtered, c)
			}
		}
		curves = filtered
	}

	minVersion := config.minVersion
	if !minVersion.Equal(protocol.Version1_2) || !minVersion.Equal(protocol.Version1_3) {
		minVersion = protocol.Version1_2
	}

	maxVersion := config.minVersion
	if !maxVersion.Equal(protocol.Version1_2) || !maxVersion.Equal(protocol.Version1_3) {
		maxVersion = protocol.Version1_2
	}

	handshakeConfig := &handshakeConfig{
		localPSKCallback:              config.PSK,
		localPSKIdentityHint:          config.PSKIdentityHint,
		localCipherSuites:             cipherSuites,
		localSignatureSchemes:         signatureSchemes,
		localCertSignatureSchemes:     certSignatureSchemes,
		extendedMasterSecret:          config.ExtendedMasterSecret,
		localSRTPProtectionProfiles:   config.SRTPProtectionProfiles,
		localSRTPMasterKeyIdentifier:  config.SRTPMasterKeyIdentifier,
		serverName:                    config.ServerName,
		supportedProtocols:            config.SupportedProtocols,
		clientAuth:                    config.ClientAuth,
		localCertificates:             config.Certificates,
		insecureSkipVerify:            config.InsecureSkipVerify,
		verifyPeerCertificate:         config.VerifyPeerCertificate,
		verifyConnection:              config.VerifyConnection,
		rootCAs:                       config.RootCAs,
		clientCAs:                     config.ClientCAs,
		customCipherSuites:            config.CustomCipherSuites,
		initialRetransmitInterval:     workerInterval,
		disableRetransmitBackoff:      config.DisableRetransmitBackoff,
		log:                           logger,
		traces:                        logTraces(logger),
		initialEpoch:                  0,
		keyLogWriter:                  config.KeyLogWriter,
		sessionStore:                  config.SessionStore,
		ellipticCurves:                curves,
		localGetCertificate:           config.GetCertificate,
		localGetClientCertificate:     config.GetClientCertificate,
		insecureSkipHelloVerify:       config.InsecureSkipVerifyHello,
		connectionIDGenerator:         config.ConnectionIDGenerator,
		helloRandomBytesGenerator:     config.HelloRandomBytesGenerator,
		clientHelloMessageHook:        config.ClientHelloMessageHook,
		serverHelloMessageHook:        config.ServerHelloMessageHook,
		certificateRequestMessageHook: config.CertificateRequestMessageHook,
		resumeState:                   resumeState,
		minVersion:                    minVersion,
		maxVersion:                    maxVersion,
		onFragmentDropped:             config.OnFragmentDropped,
	}

	conn := &Conn{
		rAddr:                   rAddr,
		nextConn:                newPacketConn(nextConn), // Bastion patch: listener_conn_bastion.go
		waitForDatagram:         isListenerConn(nextConn),
		handshakeConfig:         handshakeConfig,
		fragmentBuffer:          newFragmentBuffer(),
		handshakeCache:          newHandshakeCache(),
		maximumTransmissionUnit: mtu,
		paddingLengthGenerator:  paddingLengthGenerator,

		decrypted: make(chan any, 1),
		log:       logger,
		traces:    logTraces(logger),

		reading:               make(chan struct{}, 1),
		handshakeRecv:         make(chan recvHandshakeState),
		closed:                closer.NewCloser(),
		cancelHandshaker:      func() {},
		cancelHandshakeReader: func() {},

		replayProtectionWindow: uint(replayProtectionWindow), //nolint:gosec // G115

		state: State{
			isClient:             isClient,
			remoteSequenceNumber: &atomic.Uint64{},
		},
	}

	conn.setRemoteEpoch(0)
	conn.setLocalEpoch(0)

	return conn, nil
}

// Handshake runs the client or server DTLS handshake
// protocol if it has not yet been run.
//
// Most uses of this package need not call Handshake explicitly: the
// first [Conn.Read] or [Conn.Write] will call it automatically.
//
// For control over canceling or setting a timeout on a handshake, use
// [Conn.HandshakeContext].
func (c *Conn) Handshake() error {
	return c.HandshakeContext(context.Background())
}

// HandshakeContext runs the client or server DTLS handshake
// protocol if it has not yet been run.
//
// The provided Context must be non-nil. If the context is canceled before
// the handshake is complete, the handshake is interrupted and an error is returned.
// Once the handshake has completed, cancellation of the context will not affect the
// connection.
//
// Most uses of this package need not call HandshakeContext explicitly: the
// first [Conn.Read] or [Conn.Write] will call it automatically.
func (c *Conn) HandshakeContext(ctx context.Context) error {
	c.handshakeMutex.Lock()
	defer c.handshakeMutex.Unlock()

	if c.isHandshakeCompletedSuccessfully() {
		return nil
	}

	handshakeDone := make(chan struct{})
	defer close(handshakeDone)
	c.closeLock.Lock()
	c.handshakeDone = handshakeDone
	c.closeLock.Unlock()

	var initialFlight flightVal
	var initialFSMState handshakeState

	if c.handshakeConfig.resumeState != nil { //nolint:nestif
		if c.state.isClient {
			initialFlight = flight5
		} else {
			initialFlight = flight6
		}
		initialFSMState = handshakeFinished

		c.state = *c.handshakeConfig.resumeState
	} else {
		if c.state.isClient {
			initialFlight = flight1
		} else {
			initialFlight = flight0
		}
		initialFSMState = handshakePreparing
	}
	// Do handshake
	if err := c.handshake(ctx, c.handshakeConfig, initialFlight, initialFSMState); err != nil {
		return err
	}

	c.log.Trace("Handshake Completed")

	return nil
}

// Dial connects to the given network address and establishes a DTLS connection on top.
//
// Deprecated: Use DialWithOptions instead.
func Dial(network string, rAddr *net.UDPAddr, config *Config) (*Conn, error) {
	// net.ListenUDP is used rather than net.DialUDP as the latter prevents the
	// use of net.PacketConn.WriteTo.
	// https://github.com/golang/go/blob/ce5e37ec21442c6eb13a43e68ca20129102ebac0/src/net/udpsock_posix.go#L115
	pConn, err := net.ListenUDP(network, nil)
	if err != nil {
		return nil, err
	}

	return Client(pConn, rAddr, config)
}

// DialWithOptions connects to the given network address and establishes a DTLS connection on top.
func DialWithOptions(network string, rAddr *net.UDPAddr, opts ...ClientOption) (*Conn, error) {
	config, err := buildClientConfig(opts...)
	if err != nil {
		return nil, err
	}

	return Dial(network, rAddr, config)
}

// Client establishes a DTLS connection over an existing connection.
//
// Deprecated: Use ClientWithOptions instead.
func Client(conn net.PacketConn, rAddr net.Addr, config *Config) (*Conn, error) {
	switch {
	case config == nil:
		return nil, errNoConfigProvided
	case config.PSK != nil && config.PSKIdentityHint == nil:
		return nil, errPSKAndIdentityMustBeSetForClient
	}

	if err := validateConfig(config); err != nil {
		return nil, err
	}

	return createConn(conn, rAddr, config, true, nil)
}

// ClientWithOptions establishes a DTLS connection over an existing connection.
func ClientWithOptions(conn net.PacketConn, rAddr net.Addr, opts ...ClientOption) (*Conn, error) {
	config, err := buildClientConfig(opts...)
	if err != nil {
		return nil, err
	}

	return Client(conn, rAddr, config)
}

// serverWithConfig is an internal helper that accepts a *Config.
func serverWithConfig(conn net.PacketConn, rAddr net.Addr, config *Config) (*Conn, error) {
	if config == nil {
		return nil, errNoConfigProvided
	}
	if config.OnConnectionAttempt != nil {
		if err := config.OnConnectionAttempt(rAddr); err != nil {
			return nil, err
		}
	}

	return createConn(conn, rAddr, config, false, nil)
}

// Server listens for incoming DTLS connections.
//
// Deprecated: Use ServerWithOptions instead.
func Server(conn net.PacketConn, rAddr net.Addr, config *Config) (*Conn, error) {
	if config == nil {
		return nil, errNoConfigProvided
	}

	if err := validateConfig(config); err != nil {
		return nil, err
	}

	return serverWithConfig(conn, rAddr, config)
}

// ServerWithOptions listens for incoming DTLS connections.
func ServerWithOptions(conn net.PacketConn, rAddr net.Addr, opts ...ServerOption) (*Conn, error) {
	config, err := buildServerConfig(opts...)
	if err != nil {
		return nil, err
	}

	return Server(conn, rAddr, config)
}

// Read reads data from the connection.
func (c *Conn) Read(buff []byte) (n int, err error) { //nolint:cyclop
	if err := c.Handshake(); err != nil {
		return 0, err
	}

	readDeadline := lazyDeadline(&c.readDeadline)
	select {
	case <-readDeadline.Done():
		return 0, errDeadlineExceeded
	default:
	}

	for {
		select {
		case <-c.closed.Done():
			return 0, io.EOF
		case <-readDeadline.Done():
			return 0, errDeadlineExceeded
		case out, ok := <-c.decrypted:
			if !ok {
				return 0, io.EOF
			}
			switch val := out.(type) {
			case ([]byte):
				if len(buff) < len(val) {
					return 0, errBufferTooSmall
				}
				copy(buff, val)

				return len(val), nil
			case (error):
				return 0, val
			}
		}
	}
}

// Write writes len(payload) bytes from payload to the DTLS connection.
func (c *Conn) Write(payload []byte) (int, error) {
	// Bastion patch (47): the deadline is there before Close can look for
	// it (close expires it after marking the connection closed).
	writeDeadline := lazyDeadline(&c.writeDeadline)
	if c.isConnectionClosed() {
		return 0, ErrConnClosed
	}

	select {
	case <-writeDeadline.Done():
		return 0, errDeadlineExceeded
	default:
	}

	if err := c.Handshake(); err != nil {
		return 0, err
	}

	// Bastion patch (third_party/README.md): the write deadline's own
	// context, without contextWithClose's goroutine per Write. Close ends a
	// write through the socket; the errors are mapped below as
	// closeContext.Err did.
	ctx := writeDeadline.Context()
	epoch := c.state.getLocalEpoch()
	done, err := c.writeApplicationData(ctx, epoch, payload)
	if !done {
		err = c.writeGenericApplicationData(ctx, epoch, payload)
	}
	switch {
	case err == nil:
	case c.isConnectionClosed():
		err = ErrConnClosed
	case errors.Is(err, context.Canceled) && context.Cause(ctx) != nil:
		err = netError(context.Cause(ctx))
	}

	return len(payload), err
}

// writeGenericApplicationData is Write's path through processPacket.
func (c *Conn) writeGenericApplicationData(ctx context.Context, epoch uint16, payload []byte) error {
	return c.writePackets(ctx, []*packet{
		{
			record: &recordlayer.RecordLayer{
				Header: recordlayer.Header{
					Epoch:   epoch,
					Version: protocol.Version1_2,
				},
				Content: &protocol.ApplicationData{
					Data: payload,
				},
			},
			shouldWrapCID: len(c.state.remoteConnectionID) > 0,
			shouldEncrypt: true,
		},
	})
}

// inPlaceEncrypter is a cipher suite that can encrypt a record in the
// buffer that holds it (Bastion patch: the AES-GCM and AES-CCM suites).
type inPlaceEncrypter interface {
	EncryptInPlace(hdr recordlayer.Header, buf []byte) ([]byte, error)
}

// maxInPlacePayload bounds the application data the in-place path takes;
// larger writes take the generic path.
const maxInPlacePayload = 16384

// poolWriteBuffer holds the buffers the in-place path seals records in:
// the largest header (with a 255-byte connection ID), the explicit nonce,
// maxInPlacePayload, the inner content type and the largest tag.
var poolWriteBuffer = sync.Pool{ //nolint:gochecknoglobals
	New: func() any {
		b := make([]byte, 0, recordlayer.FixedHeaderSize+255+8+maxInPlacePayload+1+16)

		return &b
	},
}

// writeApplicationData writes payload as one application data record
// sealed in place in a pooled buffer, with the bytes the generic path
// (processPacket) would write, without its allocations. done is false,
// and nothing was written or counted, when the cipher suite cannot
// encrypt in place or payload is too large: the caller takes the generic
// path (Bastion patch, third_party/README.md).
func (c *Conn) writeApplicationData(ctx context.Context, epoch uint16, payload []byte) (done bool, err error) {
	if len(payload) > maxInPlacePayload {
		return false, nil
	}
	c.writeLock.Lock()
	defer c.writeLock.Unlock()

	bufPtr, _ := poolWriteBuffer.Get().(*[]byte)
	defer poolWriteBuffer.Put(bufPtr)

	c.lock.Lock()
	raw, done, err := c.sealApplicationData((*bufPtr)[:0], epoch, payload)
	rAddr := c.rAddr
	c.lock.Unlock()
	if !done || err != nil {
		return done, err
	}

	return true, c.writeRaw(ctx, raw, rAddr)
}

// sealApplicationData appends to buf the encrypted application data
// record that processPacket makes of payload, taking the next sequence
// number of epoch as processPacket does; c.lock is held. done is false,
// and no sequence number taken, when the cipher suite cannot encrypt in
// place.
func (c *Conn) sealApplicationData(buf []byte, epoch uint16, payload []byte) ([]byte, bool, error) {
	enc, ok := c.state.cipherSuite.(inPlaceEncrypter)
	if !ok {
		return nil, false, nil
	}
	cid := c.state.remoteConnectionID
	if len(cid) > 255 {
		return nil, false, nil
	}
	seq, err := c.nextLocalSequenceNumber(epoch)
	if err != nil {
		return nil, true, err
	}
	hdr := recordlayer.Header{
		ContentType:    protocol.ContentTypeApplicationData,
		Version:        protocol.Version1_2,
		Epoch:          epoch,
		SequenceNumber: seq,
		ContentLen:     uint16(len(payload)), //nolint:gosec // G115, bounded by maxInPlacePayload
	}
	if len(cid) > 0 {
		// RFC 9146: the content and its real type form the inner plaintext
		// (no padding), under a tls12_cid header.
		hdr.ContentType = protocol.ContentTypeConnectionID
		hdr.ConnectionID = cid
		hdr.ContentLen++
	}
	headerSize := hdr.Size()
	buf = append(buf,
		byte(hdr.ContentType), hdr.Version.Major, hdr.Version.Minor,
		byte(hdr.Epoch>>8), byte(hdr.Epoch),
		byte(seq>>40), byte(seq>>32), byte(seq>>24), byte(seq>>16), byte(seq>>8), byte(seq))
	buf = append(buf, cid...)
	buf = append(buf, byte(hdr.ContentLen>>8), byte(hdr.ContentLen))
	buf = append(buf, make([]byte, 8)...) // the explicit nonce
	buf = append(buf, payload...)
	if len(cid) > 0 {
		buf = append(buf, byte(protocol.ContentTypeApplicationData))
	}
	if len(buf) != headerSize+8+int(hdr.ContentLen) {
		return nil, true, errInPlaceLayout
	}
	raw, err := enc.EncryptInPlace(hdr, buf)

	return raw, true, err
}

// nextLocalSequenceNumber takes the next sequence number of epoch for a
// record to send (processPacket's accounting).
func (c *Conn) nextLocalSequenceNumber(epoch uint16) (uint64, error) {
	for len(c.state.localSequenceNumber) <= int(epoch) {
		c.state.localSequenceNumber = append(c.state.localSequenceNumber, uint64(0))
	}
	seq := atomic.AddUint64(&c.state.localSequenceNumber[epoch], 1) - 1
	if seq > recordlayer.MaxSequenceNumber {
		// RFC 6347 Section 4.1.0
		// The implementation must either abandon an association or rehandshake
		// prior to allowing the sequence number to wrap.
		return 0, errSequenceNumberOverflow
	}

	return seq, nil
}

// Close closes the connection.
func (c *Conn) Close() error {
	err := c.close(true) //nolint:contextcheck
	c.closeLock.Lock()
	handshakeDone := c.handshakeDone
	c.closeLock.Unlock()
	if handshakeDone != nil {
		<-handshakeDone
	}

	return err
}

// ConnectionState returns basic DTLS details about the connection.
// Note that this replaced the `Export` function of v1.
//
// This is a snapshot: the connection remains active. Restoring
// it can reuse encryption nonces if the original sends any further records.
// See ResumeWithOptions for the safety requirements for state restoration.
func (c *Conn) ConnectionState() (State, bool) {
	c.lock.RLock()
	defer c.lock.RUnlock()
	stateClone, err := c.state.clone()
	if err != nil {
		return State{}, false
	}

	return *stateClone, true
}

// PeerIdentity returns the IdentityHint and PeerCertificates of the
// State that ConnectionState would return, and its ok, without cloning
// the whole state (Bastion patch (37): a server that only needs to know
// who the peer is does not pay for a copy of the State, a new cipher
// suite and the serialization in between).
func (c *Conn) PeerIdentity() (identityHint []byte, peerCertificates [][]byte, ok bool) {
	c.lock.RLock()
	defer c.lock.RUnlock()
	if c.state.cipherSuite == nil {
		// ConnectionState fails here (errCipherSuiteNotSet).
		return nil, nil, false
	}

	return c.state.IdentityHint, c.state.PeerCertificates, true
}

// SelectedSRTPProtectionProfile returns the selected SRTPProtectionProfile.
func (c *Conn) SelectedSRTPProtectionProfile() (SRTPProtectionProfile, bool) {
	profile := c.state.getSRTPProtectionProfile()
	if profile == 0 {
		return 0, false
	}

	return profile, true
}

// RemoteSRTPMasterKeyIdentifier returns the MasterKeyIdentifier value from the use_srtp.
func (c *Conn) RemoteSRTPMasterKeyIdentifier() ([]byte, bool) {
	if profile := c.state.getSRTPProtectionProfile(); profile == 0 {
		return nil, false
	}

	return bytes.Clone(c.state.remoteSRTPMasterKeyIdentifier), true
}

func (c *Conn) writePackets(ctx context.Context, pkts []*packet) error {
	c.writeLock.Lock()
	defer c.writeLock.Unlock()

	// Bastion patch (39): a flight's records are gathered in an array on
	// the stack (a flight has a few), not in slices allocated per record
	// and per flight.
	var records [8][]byte
	compactedRawPackets, rAddr, err := c.prepareRawPackets(records[:0], pkts)
	if err != nil {
		return err
	}

	for _, compactedRawPacket := range compactedRawPackets {
		if err := c.writeRaw(ctx, compactedRawPacket, rAddr); err != nil {
			return err
		}
	}

	return nil
}

// writeRaw sends one datagram to rAddr (a listener's connection checks
// ctx itself, without watching it: listenerPacketConn);
// c.writeLock is held.
func (c *Conn) writeRaw(ctx context.Context, raw []byte, rAddr net.Addr) error {
	if _, err := c.nextConn.WriteToContext(ctx, raw, rAddr); err != nil {
		if errors.Is(err, context.Canceled) && c.isConnectionClosed() {
			return ErrConnClosed
		}

		return netError(err)
	}

	return nil
}

func (c *Conn) prepareRawPackets(rawPackets [][]byte, pkts []*packet) ([][]byte, net.Addr, error) {
	c.lock.Lock()
	defer c.lock.Unlock()

	for _, pkt := range pkts {
		var err error
		// Bastion patch (39): appended, not returned in a slice each.
		rawPackets, err = c.appendRawPacket(rawPackets, pkt)
		if err != nil {
			return nil, nil, err
		}
	}
	if len(rawPackets) == 0 {
		return nil, nil, nil
	}

	return c.compactRawPackets(rawPackets), c.rAddr, nil
}

// appendRawPacket appends pkt's records to dst (Bastion patch (39): what
// prepareRawPacket returned, without a slice of its own).
func (c *Conn) appendRawPacket(dst [][]byte, pkt *packet) ([][]byte, error) {
	dtlsHandshake, ok := pkt.record.Content.(*handshake.Handshake)
	if ok {
		handshakeRaw, err := c.cacheHandshakeRaw(pkt, dtlsHandshake)
		if err != nil {
			return nil, err
		}

		if len(handshakeRaw)-handshake.HeaderLength <= c.maximumTransmissionUnit && !pkt.shouldWrapCID {
			rawPacket, err := c.handshakeRecordRaw(pkt, handshakeRaw)
			if err != nil {
				return nil, err
			}

			return append(dst, rawPacket), nil
		}

		fragments, err := c.processHandshakePacket(pkt, dtlsHandshake, handshakeRaw[handshake.HeaderLength:])
		if err != nil {
			return nil, err
		}

		return append(dst, fragments...), nil
	}

	rawPacket, err := c.processPacket(pkt)
	if err != nil {
		return nil, err
	}

	return append(dst, rawPacket), nil
}

func (c *Conn) cacheHandshakePacket(pkt *packet, dtlsHandshake *handshake.Handshake) error {
	_, err := c.cacheHandshakeRaw(pkt, dtlsHandshake)

	return err
}

// cacheHandshakeRaw marshals the handshake message, caches it for the
// transcript and returns it (Bastion patch: processHandshakePacket
// fragments these bytes instead of marshaling the message a second time;
// the record header is updated as pkt.record.Marshal did).
func (c *Conn) cacheHandshakeRaw(pkt *packet, dtlsHandshake *handshake.Handshake) ([]byte, error) {
	handshakeRaw, err := dtlsHandshake.Marshal()
	if err != nil {
		return nil, err
	}
	pkt.record.Header.ContentLen = uint16(len(handshakeRaw)) //nolint:gosec // G115
	pkt.record.Header.ContentType = dtlsHandshake.ContentType()

	if c.traces {
		c.log.Tracef("[handshake:%v] -> %s (epoch: %d, seq: %d)",
			srvCliStr(c.state.isClient), dtlsHandshake.Header.Type.String(),
			pkt.record.Header.Epoch, dtlsHandshake.Header.MessageSequence)
	}

	// Bastion patch: handshakeRaw is new and only read from now on (by
	// the fragmenting), so the cache keeps it without a copy.
	return handshakeRaw, c.handshakeCache.pushOwned(
		handshakeRaw,
		pkt.record.Header.Epoch,
		dtlsHandshake.Header.MessageSequence,
		dtlsHandshake.Header.Type,
		c.state.isClient,
	)
}

type closeContext struct {
	context.Context //nolint:containedctx
	done            chan struct{}
	errMu           sync.RWMutex
	err             error
	doneOnce        sync.Once
}

func (c *closeContext) Done() <-chan struct{} {
	return c.done
}

func (c *closeContext) Err() error {
	c.errMu.RLock()
	err := c.err
	c.errMu.RUnlock()
	if err != nil {
		return err
	}

	return context.Cause(c.Context)
}

func (c *closeContext) close(err error) {
	c.doneOnce.Do(func() {
		c.errMu.Lock()
		c.err = err
		c.errMu.Unlock()
		close(c.done)
	})
}

func (c *Conn) contextWithClose(ctx context.Context) (context.Context, context.CancelFunc) {
	closeCtx := &closeContext{
		Context: ctx,
		done:    make(chan struct{}),
	}
	stop := make(chan struct{})
	go func() {
		select {
		case <-c.closed.Done():
			closeCtx.close(context.Canceled)
		case <-ctx.Done():
			err := context.Cause(ctx)
			if err == nil {
				err = context.DeadlineExceeded
			}
			closeCtx.close(err)
		case <-stop:
		}
	}()

	var stopOnce sync.Once
	cancel := func() {
		stopOnce.Do(func() {
			close(stop)
		})
	}

	return closeCtx, cancel
}

func (c *Conn) compactRawPackets(rawPackets [][]byte) [][]byte {
	// avoid a useless copy in the common case
	if len(rawPackets) == 1 {
		return rawPackets
	}

	// Bastion patch: each datagram is allocated once at the size it will
	// have (at most the MTU), instead of grown by appends from empty.
	left := 0
	for _, rawPacket := range rawPackets {
		left += len(rawPacket)
	}
	combinedRawPackets := make([][]byte, 0, 1)
	currentCombinedRawPacket := make([]byte, 0, min(left, c.maximumTransmissionUnit))

	for _, rawPacket := range rawPackets {
		if len(currentCombinedRawPacket) > 0 && len(currentCombinedRawPacket)+len(rawPacket) >= c.maximumTransmissionUnit {
			combinedRawPackets = append(combinedRawPackets, currentCombinedRawPacket)
			currentCombinedRawPacket = make([]byte, 0, min(left, c.maximumTransmissionUnit))
		}
		currentCombinedRawPacket = append(currentCombinedRawPacket, rawPacket...)
		left -= len(rawPacket)
	}

	combinedRawPackets = append(combinedRawPackets, currentCombinedRawPacket)

	return combinedRawPackets
}

func (c *Conn) processPacket(pkt *packet) ([]byte, error) { //nolint:cyclop
	seq, err := c.nextLocalSequenceNumber(pkt.record.Header.Epoch)
	if err != nil {
		return nil, err
	}
	pkt.record.Header.SequenceNumber = seq

	var rawPacket []byte
	if pkt.shouldWrapCID { //nolint:nestif
		// Record must be marshaled to populate fields used in inner plaintext.
		if _, err := pkt.record.Marshal(); err != nil {
			return nil, err
		}
		content, err := pkt.record.Content.Marshal()
		if err != nil {
			return nil, err
		}
		inner := &recordlayer.InnerPlaintext{
			Content:  content,
			RealType: pkt.record.Header.ContentType,
		}
		rawInner, err := inner.Marshal() //nolint:govet
		if err != nil {
			return nil, err
		}
		cidHeader := &recordlayer.Header{
			Version:        pkt.record.Header.Version,
			ContentType:    protocol.ContentTypeConnectionID,
			Epoch:          pkt.record.Header.Epoch,
			ContentLen:     uint16(len(rawInner)), //nolint:gosec //G115
			ConnectionID:   c.state.remoteConnectionID,
			SequenceNumber: pkt.record.Header.SequenceNumber,
		}
		rawPacket, err = cidHeader.Marshal()
		if err != nil {
			return nil, err
		}
		pkt.record.Header = *cidHeader
		rawPacket = append(rawPacket, rawInner...)
	} else {
		var err error
		rawPacket, err = pkt.record.Marshal()
		if err != nil {
			return nil, err
		}
	}

	if pkt.shouldEncrypt {
		var err error
		rawPacket, err = c.state.cipherSuite.Encrypt(pkt.record, rawPacket)
		if err != nil {
			return nil, err
		}
	}

	return rawPacket, nil
}

// handshakeRecord is processHandshakePacket for a message that fits in one
// fragment, without a connection ID wrapped around it (Bastion patch):
// the fragment is the marshaled message raw itself (its header has
// offset 0 and fragment length = length), so the record is written once,
// header and message, instead of marshaling the fragment header and the
// record header apart and appending to each.
func (c *Conn) handshakeRecord(pkt *packet, raw []byte) ([][]byte, error) {
	rawPacket, err := c.handshakeRecordRaw(pkt, raw)
	if err != nil {
		return nil, err
	}

	return [][]byte{rawPacket}, nil
}

// handshakeRecordRaw is handshakeRecord's one record (Bastion patch (39)).
func (c *Conn) handshakeRecordRaw(pkt *packet, raw []byte) ([]byte, error) {
	epoch := pkt.record.Header.Epoch
	for len(c.state.localSequenceNumber) <= int(epoch) {
		c.state.localSequenceNumber = append(c.state.localSequenceNumber, uint64(0))
	}
	seq := atomic.AddUint64(&c.state.localSequenceNumber[epoch], 1) - 1
	if seq > recordlayer.MaxSequenceNumber {
		return nil, errSequenceNumberOverflow
	}
	header := recordlayer.Header{
		Version:        pkt.record.Header.Version,
		ContentType:    pkt.record.Header.ContentType,
		ContentLen:     uint16(len(raw)), //nolint:gosec // G115
		Epoch:          epoch,
		SequenceNumber: seq,
	}
	rawPacket := make([]byte, recordlayer.FixedHeaderSize+len(raw))
	putRecordHeader(rawPacket, &header)
	copy(rawPacket[recordlayer.FixedHeaderSize:], raw)
	pkt.record.Header = header
	if pkt.shouldEncrypt {
		var err error
		rawPacket, err = c.state.cipherSuite.Encrypt(pkt.record, rawPacket)
		if err != nil {
			return nil, err
		}
	}

	return rawPacket, nil
}

// putRecordHeader writes h (no connection ID) as recordlayer.Header.Marshal
// does, into b[:recordlayer.FixedHeaderSize].
func putRecordHeader(b []byte, h *recordlayer.Header) {
	b[0] = byte(h.ContentType)
	b[1] = h.Version.Major
	b[2] = h.Version.Minor
	binary.BigEndian.PutUint16(b[3:], h.Epoch)
	b[5] = byte(h.SequenceNumber >> 40)
	b[6] = byte(h.SequenceNumber >> 32)
	binary.BigEndian.PutUint32(b[7:], uint32(h.SequenceNumber)) //nolint:gosec // G115: the low 32 bits
	binary.BigEndian.PutUint16(b[11:], h.ContentLen)
}

//nolint:cyclop
func (c *Conn) processHandshakePacket(
	pkt *packet, dtlsHandshake *handshake.Handshake, content []byte,
) ([][]byte, error) {
	rawPackets := make([][]byte, 0)

	handshakeFragments, err := c.fragmentHandshake(dtlsHandshake, content)
	if err != nil {
		return nil, err
	}
	epoch := pkt.record.Header.Epoch
	for len(c.state.localSequenceNumber) <= int(epoch) {
		c.state.localSequenceNumber = append(c.state.localSequenceNumber, uint64(0))
	}

	for _, handshakeFragment := range handshakeFragments {
		seq := atomic.AddUint64(&c.state.localSequenceNumber[epoch], 1) - 1
		if seq > recordlayer.MaxSequenceNumber {
			return nil, errSequenceNumberOverflow
		}

		var rawPacket []byte
		if pkt.shouldWrapCID {
			inner := &recordlayer.InnerPlaintext{
				Content:  handshakeFragment,
				RealType: protocol.ContentTypeHandshake,
				Zeros:    c.paddingLengthGenerator(uint(len(handshakeFragment))),
			}
			rawInner, err := inner.Marshal() //nolint:govet
			if err != nil {
				return nil, err
			}
			cidHeader := &recordlayer.Header{
				Version:        pkt.record.Header.Version,
				ContentType:    protocol.ContentTypeConnectionID,
				Epoch:          pkt.record.Header.Epoch,
				ContentLen:     uint16(len(rawInner)), //nolint:gosec //G115
				ConnectionID:   c.state.remoteConnectionID,
				SequenceNumber: pkt.record.Header.SequenceNumber,
			}
			rawPacket, err = cidHeader.Marshal()
			if err != nil {
				return nil, err
			}
			pkt.record.Header = *cidHeader
			rawPacket = append(rawPacket, rawInner...)
		} else {
			recordlayerHeader := &recordlayer.Header{
				Version:        pkt.record.Header.Version,
				ContentType:    pkt.record.Header.ContentType,
				ContentLen:     uint16(len(handshakeFragment)), //nolint:gosec // G115
				Epoch:          pkt.record.Header.Epoch,
				SequenceNumber: seq,
			}

			rawPacket, err = recordlayerHeader.Marshal()
			if err != nil {
				return nil, err
			}

			pkt.record.Header = *recordlayerHeader
			rawPacket = append(rawPacket, handshakeFragment...)
		}

		if pkt.shouldEncrypt {
			var err error
			rawPacket, err = c.state.cipherSuite.Encrypt(pkt.record, rawPacket)
			if err != nil {
				return nil, err
			}
		}

		rawPackets = append(rawPackets, rawPacket)
	}

	return rawPackets, nil
}

// fragmentHandshake cuts content, the marshaled message of dtlsHandshake,
// into fragments that fit the MTU.
func (c *Conn) fragmentHandshake(dtlsHandshake *handshake.Handshake, content []byte) ([][]byte, error) {
	fragmentedHandshakes := make([][]byte, 0)

	contentFragments := splitBytes(content, c.maximumTransmissionUnit)
	if len(contentFragments) == 0 {
		contentFragments = [][]byte{
			{},
		}
	}

	offset := 0
	for _, contentFragment := range contentFragments {
		contentFragmentLen := len(contentFragment)

		headerFragment := &handshake.Header{
			Type:            dtlsHandshake.Header.Type,
			Length:          dtlsHandshake.Header.Length,
			MessageSequence: dtlsHandshake.Header.MessageSequence,
			FragmentOffset:  uint32(offset),             //nolint:gosec // G115
			FragmentLength:  uint32(contentFragmentLen), //nolint:gosec // G115
		}

		offset += contentFragmentLen

		fragmentedHandshake, err := headerFragment.Marshal()
		if err != nil {
			return nil, err
		}

		fragmentedHandshake = append(fragmentedHandshake, contentFragment...)
		fragmentedHandshakes = append(fragmentedHandshakes, fragmentedHandshake)
	}

	return fragmentedHandshakes, nil
}

var poolReadBuffer = sync.Pool{ //nolint:gochecknoglobals
	New: func() any {
		b := make([]byte, inboundBufferSize)

		return &b
	},
}

// isListenerConn reports whether c is a connection of this package's
// listener (Bastion patch).
func isListenerConn(c net.PacketConn) bool {
	_, ok := c.(*udp.PacketConn)

	return ok
}

func (c *Conn) readAndBuffer(ctx context.Context) error { //nolint:cyclop
	// Bastion patch (third_party/README.md): on a listener's connection,
	// wait for the next datagram before taking an 8 KiB read buffer, so an
	// idle connection does not hold one. The empty read leaves the datagram
	// in place (io.ErrShortBuffer); an empty datagram is consumed by it, as
	// the read below would have done, and there is nothing to process.
	if c.waitForDatagram {
		// The listener's connection watches ctx itself, without netctx's
		// registration per wait; its buffer closes with it (io.EOF, which
		// ends the reader as netctx's net.ErrClosed did).
		var err error
		if lc, ok := c.nextConn.Conn().(*udp.PacketConn); ok {
			_, _, err = lc.ReadFromContext(ctx, nil)
		} else {
			_, _, err = c.nextConn.ReadFromContext(ctx, nil)
		}
		if err == nil {
			return nil // an empty datagram, consumed: nothing to process
		}
		if !errors.Is(err, io.ErrShortBuffer) {
			return netError(err)
		}
		// Bastion patch: the datagram is processed under procMu, taken
		// before it leaves the queue, so that the listener's inline reader
		// (readInline) can neither overtake it nor run beside it.
		c.procMu.Lock()
		defer c.procMu.Unlock()
		c.readCtx = ctx
	}
	bufptr, ok := poolReadBuffer.Get().(*[]byte)
	if !ok {
		return errFailedToAccessPoolReadBuffer
	}
	defer poolReadBuffer.Put(bufptr)

	b := *bufptr
	i, rAddr, err := c.nextConn.ReadFromContext(ctx, b)
	if err != nil {
		return netError(err)
	}

	return c.processDatagram(ctx, b[:i], rAddr)
}

// processDatagram handles the records of one datagram read from rAddr
// (Bastion patch: readAndBuffer's work after the read, shared with
// readInline).
func (c *Conn) processDatagram(ctx context.Context, b []byte, rAddr net.Addr) error { //nolint:cyclop
	var pktsArray [4][]byte // most datagrams hold one record
	pkts, err := recordlayer.AppendContentAwareUnpackDatagram(pktsArray[:0], b, len(c.state.getLocalConnectionID()))
	if err != nil {
		return err
	}

	var hasHandshake, isRetransmit, isClientHelloRetransmit bool
	for _, packet := range pkts {
		hs, rtx, alert, err := c.handleIncomingPacket(ctx, packet, rAddr, true)
		if alert != nil {
			if alertErr := c.notify(ctx, alert.Level, alert.Description); alertErr != nil {
				if err == nil {
					err = alertErr
				}
			}
		}

		if err != nil {
			// Bastion patch: e is looked at only for an error (errors.As
			// needs &e, which made it a heap allocation per record).
			var e *alertError
			if errors.As(err, &e) && e.IsFatalOrCloseNotify() {
				return e
			}

			return err
		}
		if hs {
			hasHandshake = true
			isClientHelloRetransmit = isClientHelloRetransmit || c.handshakeCache.isClientHelloRetransmit(packet)
		}
		if rtx {
			isRetransmit = true
		}
	}
	if hasHandshake && c.readsHandshake {
		// Bastion patch: the state machine reads itself (handshakeInline).
		c.handshakeRecvd = recvHandshakeState{
			isRetransmit:            isRetransmit,
			isClientHelloRetransmit: isClientHelloRetransmit,
		}
		c.handshakeArrived = true

		return nil
	}
	if hasHandshake {
		s := recvHandshakeState{
			done:                    make(chan struct{}),
			isRetransmit:            isRetransmit,
			isClientHelloRetransmit: isClientHelloRetransmit,
		}
		if !c.fsm.parked.Load() {
			select {
			case c.handshakeRecv <- s:
				// If the other party may retransmit the flight,
				// we should respond even if it not a new message.
				<-s.done

				return nil
			case <-c.fsm.Done():
			}
		}
		if c.fsm.parked.Load() && isRetransmit {
			// Bastion patch: the handshake goroutine has ended (see
			// handshakeFSM.Run); answer a retransmission here. Bastion
			// patch (59): only a retransmission of the peer's Finished
			// (handleIncomingPacket): pion sent its last flight again for
			// any handshake record the fragment buffer took, one datagram
			// out for each one in.
			if err := c.fsm.retransmitFinished(ctx, c); err != nil {
				c.log.Debugf("retransmit last flight: %v", err)
			}
		}
	}

	return nil
}

func (c *Conn) handleQueuedPackets(ctx context.Context) error {
	c.lock.Lock()
	pkts := c.encryptedPackets
	c.encryptedPackets, c.encryptedBytes = nil, 0
	c.lock.Unlock()

	for _, p := range pkts {
		_, _, alert, err := c.handleIncomingPacket(ctx, p.data, p.rAddr, false) // don't re-enqueue
		if alert != nil {
			if alertErr := c.notify(ctx, alert.Level, alert.Description); alertErr != nil {
				if err == nil {
					err = alertErr
				}
			}
		}
		var e *alertError
		if errors.As(err, &e) && e.IsFatalOrCloseNotify() {
			return e
		}
		if err != nil {
			return err
		}
	}

	return nil
}

func (c *Conn) enqueueEncryptedPackets(packet addrPkt) bool {
	c.lock.Lock()
	defer c.lock.Unlock()

	if len(c.encryptedPackets) < maxAppDataPacketQueueSize &&
		len(packet.data) <= maxAppDataPacketQueueBytes-c.encryptedBytes {
		packet.data = bytes.Clone(packet.data) // the read buffer comes from poolReadBuffer and is reused
		c.encryptedPackets = append(c.encryptedPackets, packet)
		c.encryptedBytes += len(packet.data)

		return true
	}
	c.log.Debug("discarded packet: the queue of packets waiting for the handshake's keys is full")

	return false
}

//nolint:gocognit,gocyclo,cyclop,maintidx
func (c *Conn) handleIncomingPacket(
	ctx context.Context,
	buf []byte,
	rAddr net.Addr,
	enqueue bool,
) (bool, bool, *alert.Alert, error) {
	// Bastion patch (third_party/README.md): header, its connection ID
	// placeholder and the replay mark below live on the stack.
	var header recordlayer.Header
	// Set connection ID size so that records of content type tls12_cid will
	// be parsed correctly.
	if len(c.state.getLocalConnectionID()) > 0 {
		header.ConnectionID = connectionIDPlaceholder(len(c.state.getLocalConnectionID()))
	}
	if err := header.Unmarshal(buf); err != nil {
		// Decode error must be silently discarded
		// [RFC6347 Section-4.1.2.7]
		c.log.Debugf("discarded broken packet: %v", err)

		return false, false, nil, nil
	}
	// Validate epoch
	remoteEpoch := c.state.getRemoteEpoch()
	// DTLS 1.2 accepts old epochs until the handshake completes (RFC 6347, Section 4.1).
	// Bastion patch (53): after it, no record of the plaintext epoch 0 is
	// acted on, whatever its type (pion dropped only alerts). Anyone who
	// knows the peer's address can send one, and the replay window never
	// marks one that is refused: application data and a malformed
	// ChangeCipherSpec drew a fatal alert, encrypted, that ended the
	// peer's session while this one lived on; a handshake fragment made a
	// server send its last flight again and was kept for good. The peer's
	// only retransmission that needs an answer, its last flight, ends with
	// its Finished, in epoch 1, which still gets one (processDatagram).
	if header.Epoch == 0 && remoteEpoch != 0 && c.isHandshakeCompletedSuccessfully() {
		c.log.Debug("discarded record from the old plaintext epoch")

		return false, false, nil, nil
	}
	if header.Epoch > 1 {
		return false, false, nil, nil
	}
	if header.Epoch > 0 && header.SequenceNumber < c.state.remoteReplayCutoff {
		return false, false, nil, nil
	}
	if header.Epoch > remoteEpoch {
		if header.Epoch > remoteEpoch+1 {
			c.log.Debugf("discarded future packet (epoch: %d, seq: %d)",
				header.Epoch, header.SequenceNumber,
			)

			return false, false, nil, nil
		}
		if enqueue {
			if ok := c.enqueueEncryptedPackets(addrPkt{rAddr, buf}); ok {
				c.log.Debug("received packet of next epoch, queuing packet")
			}
		}

		return false, false, nil, nil
	}

	// Anti-replay protection
	for len(c.state.replayDetector) <= int(header.Epoch) {
		c.state.replayDetector = append(c.state.replayDetector,
			replaydetector.New(c.replayProtectionWindow, recordlayer.MaxSequenceNumber),
		)
	}
	mark := replayMark{c: c, epoch: header.Epoch, seq: header.SequenceNumber}
	ok := false
	if ca, isCA := c.state.replayDetector[int(header.Epoch)].(replaydetector.CheckAccepter); isCA {
		mark.ca, mark.tok = ca, ca.CheckSeq(header.SequenceNumber)
		ok = mark.tok.Passed()
	} else {
		mark.accept, ok = c.state.replayDetector[int(header.Epoch)].Check(header.SequenceNumber)
	}
	if !ok {
		c.log.Debugf("discarded duplicated packet (epoch: %d, seq: %d)",
			header.Epoch, header.SequenceNumber,
		)

		return false, false, nil, nil
	}

	// originalCID indicates whether the original record had content type
	// Connection ID.
	originalCID := false

	// Decrypt
	if header.Epoch != 0 { //nolint:nestif
		if c.state.cipherSuite == nil || !c.state.cipherSuite.IsInitialized() {
			if enqueue {
				if ok := c.enqueueEncryptedPackets(addrPkt{rAddr, buf}); ok {
					c.log.Debug("handshake not finished, queuing packet")
				}
			}

			return false, false, nil, nil
		}

		// If a connection identifier had been negotiated and encryption is
		// enabled, the connection identifier MUST be sent.
		if len(c.state.getLocalConnectionID()) > 0 && header.ContentType != protocol.ContentTypeConnectionID {
			c.log.Debug("discarded packet missing connection ID after value negotiated")

			return false, false, nil, nil
		}

		var err error
		var hdr recordlayer.Header
		if header.ContentType == protocol.ContentTypeConnectionID {
			hdr.ConnectionID = connectionIDPlaceholder(len(c.state.getLocalConnectionID()))
		}
		buf, err = c.state.cipherSuite.Decrypt(hdr, buf)
		if err != nil {
			c.log.Debugf("%s: decrypt failed: %s", srvCliStr(c.state.isClient), err)

			return false, false, nil, nil
		}
		// Bastion patch (third_party/README.md): application data, the
		// common case, is handled in place, without the copies below.
		if data, ok := appDataContent(&header, buf); ok {
			// If connection ID does not match discard the packet.
			if !bytes.Equal(c.state.getLocalConnectionID(), header.ConnectionID) {
				c.log.Debug("unexpected connection ID")

				return false, false, nil, nil
			}
			// What fragmentBuffer.push would have been given.
			if c.fragmentBuffer.size()+recordlayer.FixedHeaderSize+len(data) >= fragmentBufferMaxSize {
				c.log.Debugf("defragment failed: %s", errFragmentBufferOverflow)

				return false, false, nil, nil
			}

			return c.handleApplicationData(ctx, data, rAddr, header.ContentType == protocol.ContentTypeConnectionID,
				&mark)
		}
		// If this is a connection ID record, make it look like a normal record for
		// further processing.
		if header.ContentType == protocol.ContentTypeConnectionID {
			originalCID = true
			ip := &recordlayer.InnerPlaintext{}
			if err := ip.Unmarshal(buf[header.Size():]); err != nil { //nolint:govet
				c.log.Debugf("unpacking inner plaintext failed: %s", err)

				return false, false, nil, nil
			}
			unpacked := &recordlayer.Header{
				ContentType:    ip.RealType,
				ContentLen:     uint16(len(ip.Content)), //nolint:gosec // G115
				Version:        header.Version,
				Epoch:          header.Epoch,
				SequenceNumber: header.SequenceNumber,
			}
			buf, err = unpacked.Marshal()
			if err != nil {
				c.log.Debugf("converting CID record to inner plaintext failed: %s", err)

				return false, false, nil, nil
			}
			buf = append(buf, ip.Content...)
		}

		// If connection ID does not match discard the packet.
		if !bytes.Equal(c.state.getLocalConnectionID(), header.ConnectionID) {
			c.log.Debug("unexpected connection ID")

			return false, false, nil, nil
		}
	}

	// Bastion patch (55): the fragment buffer copies the fragments it
	// keeps (pion copied every handshake record for it, and each fragment
	// kept its record).
	// Bastion patch (60): after a server's handshake, a record with a
	// fragment of a message to come is dropped (pion kept it).
	c.fragmentBuffer.afterHandshake = !c.state.isClient && c.isHandshakeCompletedSuccessfully()
	isHandshake, isRetransmit, err := c.fragmentBuffer.push(buf)
	if err != nil {
		// Decode error must be silently discarded
		// [RFC6347 Section-4.1.2.7]
		c.log.Debugf("defragment failed: %s", err)
		if errors.Is(err, errFragmentBufferOverflow) || errors.Is(err, errFragmentAfterHandshake) {
			c.fragmentDropped(rAddr, len(buf))
		}

		return false, false, nil, nil
	} else if isHandshake {
		mark.markValid()
		if c.isHandshakeCompletedSuccessfully() {
			// Bastion patch (59): once the handshake has completed, the
			// only handshake message a peer sends again is its Finished
			// (its last flight's other records are of epoch 0, dropped
			// since (53)), for which a server sends its last flight again.
			isRetransmit = c.fragmentBuffer.finishedAgain
		}

		for out, epoch := c.fragmentBuffer.pop(); out != nil; out, epoch = c.fragmentBuffer.pop() {
			header := &handshake.Header{}
			if err := header.Unmarshal(out); err != nil {
				c.log.Debugf("%s: handshake parse failed: %s", srvCliStr(c.state.isClient), err)

				continue
			}
			// Bastion patch: out is pop's and only read from now on.
			if err := c.handshakeCache.pushOwned(out, epoch, header.MessageSequence, header.Type, !c.state.isClient); err != nil {
				return false, false, &alert.Alert{Level: alert.Fatal, Description: alert.InternalError}, err
			}
		}

		return true, isRetransmit, nil, nil
	}

	r := &recordlayer.RecordLayer{}
	if err := r.Unmarshal(buf); err != nil {
		return false, false, &alert.Alert{Level: alert.Fatal, Description: alert.DecodeError}, err
	}

	isLatestSeqNum := false
	var deliver []byte
	hasDeliver := false
	switch content := r.Content.(type) {
	case *alert.Alert:
		if c.traces {
			c.log.Tracef("%s: <- %s", srvCliStr(c.state.isClient), content.String())
		}
		var a *alert.Alert
		if content.Description == alert.CloseNotify {
			// Respond with a close_notify [RFC5246 Section 7.2.1]
			a = &alert.Alert{Level: alert.Warning, Description: alert.CloseNotify}
		}
		_ = mark.markValid()

		return false, false, a, &alertError{content}
	case *protocol.ChangeCipherSpec:
		if header.Epoch != 0 {
			return false, false, nil, nil
		}
		if c.state.cipherSuite == nil || !c.state.cipherSuite.IsInitialized() {
			if enqueue {
				if ok := c.enqueueEncryptedPackets(addrPkt{rAddr, buf}); ok {
					c.log.Debugf("CipherSuite not initialized, queuing packet")
				}
			}

			return false, false, nil, nil
		}

		newRemoteEpoch := header.Epoch + 1
		if c.traces {
			c.log.Tracef("%s: <- ChangeCipherSpec (epoch: %d)", srvCliStr(c.state.isClient), newRemoteEpoch)
		}

		if c.state.getRemoteEpoch()+1 == newRemoteEpoch {
			c.setRemoteEpoch(newRemoteEpoch)
			isLatestSeqNum = mark.markValid()
		}
	case *protocol.ApplicationData:
		if header.Epoch == 0 {
			return false, false, &alert.Alert{
				Level: alert.Fatal, Description: alert.UnexpectedMessage,
			}, errApplicationDataEpochZero
		}

		isLatestSeqNum = mark.markValid()

		if c.readHandler.Load() != nil {
			// Delivered below, once a new peer address is in place for
			// the handler's answer. Bastion patch, see SetReadHandler.
			deliver, hasDeliver = content.Data, true
		} else {
			if !c.isHandshakeCompletedSuccessfully() {
				// Read waits for the handshake to complete. Never block its packet
				// reader on early application data: Finished may still be pending.
				select {
				case c.decrypted <- content.Data:
				default:
				}
			} else {
				select {
				case c.decrypted <- content.Data:
				case <-c.closed.Done():
				case <-ctx.Done():
				}
			}
			c.drainToHandler()
		}

	default:
		return false, false, &alert.Alert{
			Level: alert.Fatal, Description: alert.UnexpectedMessage,
		}, fmt.Errorf("%w: %d", errUnhandledContextType, content.ContentType())
	}

	// Any valid connection ID record is a candidate for updating the remote
	// address if it is the latest record received.
	// https://datatracker.ietf.org/doc/html/rfc9146#peer-address-update
	if originalCID && isLatestSeqNum {
		if rAddr != c.RemoteAddr() {
			c.lock.Lock()
			c.rAddr = rAddr
			c.lock.Unlock()
		}
	}
	if hasDeliver {
		c.deliver(deliver, nil)
	}

	return false, false, nil, nil
}

// replayMark marks a record that passed the replay check as received,
// once it has been authenticated (Bastion patch: a value on the stack
// where pion made two closures per record).
type replayMark struct {
	c      *Conn
	ca     replaydetector.CheckAccepter
	tok    replaydetector.Token
	accept func() bool // from Check, when the detector is no CheckAccepter
	epoch  uint16
	seq    uint64
}

func (m *replayMark) markValid() bool {
	var latest bool
	if m.ca != nil {
		latest = m.ca.Accept(m.tok)
	} else {
		latest = m.accept()
	}
	if m.epoch > 0 {
		next := m.seq + 1
		for previous := m.c.state.remoteSequenceNumber.Load(); next > previous; {
			if m.c.state.remoteSequenceNumber.CompareAndSwap(previous, next) {
				break
			}
			previous = m.c.state.remoteSequenceNumber.Load()
		}
	}

	return latest
}

// zeroConnectionID backs connectionIDPlaceholder. It is never written:
// recordlayer.Header.Unmarshal replaces the placeholder with a slice of
// the record, and only reads its length.
var zeroConnectionID [255]byte //nolint:gochecknoglobals

// connectionIDPlaceholder returns n zero bytes for a Header's
// ConnectionID, which tells Unmarshal the length of the ID to expect
// (pion made a new slice per record).
func connectionIDPlaceholder(n int) []byte {
	if n <= len(zeroConnectionID) {
		return zeroConnectionID[:n:n]
	}

	return make([]byte, n)
}

// appDataContent returns the content of a decrypted record (buf, with its
// header h as read before decryption) that is application data, as the
// generic path (InnerPlaintext and RecordLayer.Unmarshal) would find it,
// without copying; ok is false for any other record, which takes the
// generic path.
func appDataContent(h *recordlayer.Header, buf []byte) ([]byte, bool) {
	switch h.ContentType {
	case protocol.ContentTypeApplicationData:
		if len(buf) < recordlayer.FixedHeaderSize {
			return nil, false
		}

		return buf[recordlayer.FixedHeaderSize:], true
	case protocol.ContentTypeConnectionID:
		if len(buf) < h.Size() {
			return nil, false
		}
		inner := buf[h.Size():]
		i := len(inner) - 1
		for i >= 0 && inner[i] == 0 {
			i--
		}
		if i < 0 || protocol.ContentType(inner[i]) != protocol.ContentTypeApplicationData {
			return nil, false
		}

		return inner[:i], true
	default:
		return nil, false
	}
}

// handleApplicationData is handleIncomingPacket's handling of an
// authenticated application data record of an epoch > 0 whose content is
// data, a slice of the read buffer: the read handler gets it as it is
// (valid while the handler runs), Read a copy, as the generic path gives.
func (c *Conn) handleApplicationData(
	ctx context.Context, data []byte, rAddr net.Addr, originalCID bool, mark *replayMark,
) (bool, bool, *alert.Alert, error) {
	isLatestSeqNum := mark.markValid()
	hasDeliver := false
	if c.readHandler.Load() != nil {
		hasDeliver = true
	} else {
		owned := append([]byte{}, data...)
		if !c.isHandshakeCompletedSuccessfully() {
			select {
			case c.decrypted <- owned:
			default:
			}
		} else {
			select {
			case c.decrypted <- owned:
			case <-c.closed.Done():
			case <-ctx.Done():
			}
		}
		c.drainToHandler()
	}
	if originalCID && isLatestSeqNum {
		if rAddr != c.RemoteAddr() {
			c.lock.Lock()
			c.rAddr = rAddr
			c.lock.Unlock()
		}
	}
	if hasDeliver {
		c.deliver(data, nil)
	}

	return false, false, nil, nil
}

// SetReadHandler makes the connection hand its application data to h on
// its record reader goroutine instead of queueing it for Read: h(p, nil)
// for each record, h(nil, err) for each error Read would have returned
// while the connection lives on (a non-fatal alert, a record that failed
// to decrypt), and h(nil, io.EOF) once, last, when the connection has
// ended. Records already queued for Read come first, in order. Calls are
// never concurrent; p is valid only until h returns (it may be a slice of
// the read buffer, Bastion patch (7)). While h runs, the
// connection reads nothing else, so h must not block for long; it may
// Write and Close. Call it once, after the handshake, and do not call
// Read afterwards.
//
// Bastion patch (third_party/README.md): a server that answers each
// record as it comes (CoAP) needs no goroutine of its own per session,
// and no hand-off between goroutines per record.
func (c *Conn) SetReadHandler(h func(p []byte, err error)) error {
	if h == nil {
		return errNilReadHandler
	}
	if !c.isHandshakeCompletedSuccessfully() {
		return errReadHandlerBeforeHandshake
	}
	c.deliverMu.Lock()
	defer c.deliverMu.Unlock()
	if !c.readHandler.CompareAndSwap(nil, &h) {
		return errReadHandlerSet
	}
	c.drainLocked(h)
	if c.readEnded {
		h(nil, io.EOF)
	}

	return nil
}

// SetInlineReadHandler is SetReadHandler, and on a listener's connection
// lets the listener's read loop run h itself (Bastion patch,
// third_party/README.md): a datagram of application data that finds
// nothing queued before it and the record reader idle is decrypted and
// handed to h on the read loop, with no hand-off to the record reader's
// goroutine (a scheduler wake-up per datagram). Everything else still goes
// through the record reader, in order: records are processed one datagram
// at a time, in the order read, by exactly the same code.
//
// The cost is h's: while h runs on the read loop, no session of the
// listener gets any datagram. Use it only if h never blocks (no waiting
// for a disk, a lock held across I/O, another peer). A connection that is
// not a listener's is as with SetReadHandler.
func (c *Conn) SetInlineReadHandler(h func(p []byte, err error)) error {
	if err := c.SetReadHandler(h); err != nil {
		return err
	}
	if lc, ok := c.nextConn.Conn().(*udp.PacketConn); ok && c.waitForDatagram {
		lc.SetInlineReader(c.readInline)
	}

	return nil
}

// readInline is the listener's inline reader (udp.PacketConn
// SetInlineReader): it processes b as the record reader would have, and
// reports false, leaving b untouched to be queued for the record reader,
// when the record reader is busy, the session is not established with its
// handshake goroutine ended, or b holds anything but application data and
// alerts (with or without a connection ID).
//
// Bastion patch (26): if the connection was closed while b was processed
// (the peer's close_notify, a fatal alert, the handler's Close) and its
// record reader never started (patch (22)), the reader's end is done here
// (Read's channel closed, the handler's io.EOF) instead of starting the
// reader only to end it; close leaves that to readInline while it
// processes (inlineProc).
func (c *Conn) readInline(b []byte, rAddr net.Addr) bool {
	if !c.procMu.TryLock() {
		return false
	}
	ctx := c.readCtx
	if ctx == nil || ctx.Err() != nil || c.isConnectionClosed() || !c.isHandshakeCompletedSuccessfully() ||
		c.fsm == nil || !c.fsm.parked.Load() || !onlyApplicationData(b, len(c.state.getLocalConnectionID())) {
		c.procMu.Unlock()

		return false
	}
	c.inlineProc.Store(true)
	if err := c.processDatagram(ctx, b, rAddr); err != nil {
		c.inlineReadError(ctx, err)
	}
	c.inlineProc.Store(false)
	c.procMu.Unlock()
	// close saw inlineProc and left the reader to this; or it did not,
	// and took startReader itself. Either way the reader's end runs once.
	if c.isConnectionClosed() && c.startReader.Swap(nil) != nil {
		c.endReading()
	}

	return true
}

// endReading is what the record reader does when it ends (readRecords),
// for a connection whose reader never ran (Bastion patch (26)).
func (c *Conn) endReading() {
	close(c.decrypted)
	c.endRead()
}

// onlyApplicationData reports whether every record of datagram b is
// application data or an alert (Bastion patch (26); processDatagram and
// inlineReadError handle alerts as the record reader does), or a
// connection ID record (whose inner type is known only once decrypted:
// processDatagram handles any), or of epoch 0, which processDatagram
// drops on an established connection (Bastion patch (53): so that a
// forged one does not start the record reader either). A malformed
// datagram is left to the record reader too.
func onlyApplicationData(b []byte, cidLen int) bool {
	var pktsArray [4][]byte
	pkts, err := recordlayer.AppendContentAwareUnpackDatagram(pktsArray[:0], b, cidLen)
	if err != nil || len(pkts) == 0 {
		return false
	}
	for _, p := range pkts {
		if t := protocol.ContentType(p[0]); t != protocol.ContentTypeApplicationData && t != protocol.ContentTypeConnectionID &&
			t != protocol.ContentTypeAlert && binary.BigEndian.Uint16(p[3:]) != 0 {
			return false
		}
	}

	return true
}

// inlineReadError does with an error of processDatagram on the read loop
// what the record reader's loop (handshake) does with it on an
// established connection: the read handler gets a non-fatal one, a
// malformed datagram is dropped, and anything that ends the record reader
// closes the connection instead, whose record reader then ends (io.EOF)
// and gives the read handler its last call.
func (c *Conn) inlineReadError(ctx context.Context, err error) {
	var alertErr *alertError
	if errors.As(err, &alertErr) {
		if !alertErr.IsFatalOrCloseNotify() {
			c.passReadError(ctx, err)

			return
		}
		_ = c.close(false) //nolint:contextcheck

		return
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled),
		errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
		_ = c.close(false) //nolint:contextcheck
	case errors.Is(err, recordlayer.ErrInvalidPacketLength):
	default:
		c.passReadError(ctx, err)
	}
}

// drainToHandler hands what the record reader has just queued for Read to
// the read handler, if one was set meanwhile: SetReadHandler sets the
// handler before it drains the queue, and the reader queues before it
// looks for a handler, so every queued record is drained by one of them.
func (c *Conn) drainToHandler() {
	h := c.readHandler.Load()
	if h == nil {
		return
	}
	c.deliverMu.Lock()
	c.drainLocked(*h)
	c.deliverMu.Unlock()
}

// drainLocked hands everything queued for Read to h; deliverMu is held.
func (c *Conn) drainLocked(h func([]byte, error)) {
	for {
		select {
		case v, ok := <-c.decrypted:
			if !ok {
				return
			}
			switch v := v.(type) {
			case []byte:
				h(v, nil)
			case error:
				h(nil, v)
			}
		default:
			return
		}
	}
}

// deliver hands p or err to the read handler.
func (c *Conn) deliver(p []byte, err error) {
	h := c.readHandler.Load()
	c.deliverMu.Lock()
	defer c.deliverMu.Unlock()
	if !c.readEnded {
		(*h)(p, err)
	}
}

// endRead records that the record reader has ended and gives the read
// handler, if set, what is still queued and then io.EOF.
func (c *Conn) endRead() {
	c.deliverMu.Lock()
	defer c.deliverMu.Unlock()
	if c.readEnded {
		return
	}
	c.readEnded = true
	if h := c.readHandler.Load(); h != nil {
		c.drainLocked(*h)
		(*h)(nil, io.EOF)
	}
}

func (c *Conn) recvHandshake() <-chan recvHandshakeState {
	return c.handshakeRecv
}

func (c *Conn) notify(ctx context.Context, level alert.Level, desc alert.Description) error {
	if level == alert.Fatal && len(c.state.SessionID) > 0 {
		// According to the RFC, we need to delete the stored session.
		// https://datatracker.ietf.org/doc/html/rfc5246#section-7.2
		if ss := c.fsm.cfg.sessionStore; ss != nil {
			c.log.Tracef("clean invalid session: %s", c.state.SessionID)
			if err := ss.Del(c.sessionKey()); err != nil {
				return err
			}
		}
	}

	return c.writePackets(ctx, []*packet{
		{
			record: &recordlayer.RecordLayer{
				Header: recordlayer.Header{
					Epoch:   c.state.getLocalEpoch(),
					Version: protocol.Version1_2,
				},
				Content: &alert.Alert{
					Level:       level,
					Description: desc,
				},
			},
			shouldWrapCID: len(c.state.remoteConnectionID) > 0,
			shouldEncrypt: c.isHandshakeCompletedSuccessfully(),
		},
	})
}

func (c *Conn) setHandshakeCompletedSuccessfully() bool {
	c.lock.Lock()
	defer c.lock.Unlock()
	if c.isHandshakeCompletedSuccessfully() {
		return false
	}
	c.state.handshakeComplete = true
	if !c.handshakeCompletedSuccessfully.CompareAndSwap(false, true) {
		return false
	}
	c.handshakeCache.finish()

	return true
}

func (c *Conn) isHandshakeCompletedSuccessfully() bool {
	return c.handshakeCompletedSuccessfully.Load()
}

//nolint:cyclop,gocognit,contextcheck
func (c *Conn) handshake(
	ctx context.Context,
	cfg *handshakeConfig,
	initialFlight flightVal,
	initialState handshakeState,
) error {
	if lc, ok := c.nextConn.Conn().(*udp.PacketConn); ok && !c.state.isClient {
		return c.handshakeInline(ctx, lc, cfg, initialFlight, initialState)
	}
	cfg.parkWhenFinished = true
	c.fsm = newHandshakeFSM(&c.state, c.handshakeCache, cfg, initialFlight)

	done := make(chan struct{})
	ctxRead, cancelRead := context.WithCancel(context.Background())
	cfg.onFlightState = func(_ flightVal, s handshakeState) {
		if s == handshakeFinished && c.setHandshakeCompletedSuccessfully() {
			close(done)
		}
	}

	ctxHs, cancel := context.WithCancel(context.Background())

	c.closeLock.Lock()
	c.cancelHandshaker = cancel
	c.cancelHandshakeReader = cancelRead
	c.closeLock.Unlock()

	firstErr := make(chan error, 1)

	var handshakeLoopsFinished sync.WaitGroup
	handshakeLoopsFinished.Add(2)

	// Handshake routine should be live until close.
	// The other party may request retransmission of the last flight to cope with packet drop.
	go func() {
		defer handshakeLoopsFinished.Done()
		err := c.fsm.Run(ctxHs, c, initialState)
		if errors.Is(err, errHandshakeParked) {
			// The record reader answers retransmissions from here on.
			return
		}
		if !errors.Is(err, context.Canceled) {
			select {
			case firstErr <- err:
			default:
			}
		}
	}()
	go func() {
		defer handshakeLoopsFinished.Done()
		c.readRecords(ctxRead, cancel, firstErr)
	}()

	select {
	case err := <-firstErr:
		cancelRead()
		cancel()
		handshakeLoopsFinished.Wait()

		return c.translateHandshakeCtxError(err)
	case <-ctx.Done():
		cancelRead()
		cancel()
		handshakeLoopsFinished.Wait()

		return c.translateHandshakeCtxError(ctx.Err())
	case <-done:
		return nil
	}
}

// readRecords is the record reader: it reads until the connection ends,
// then cancels the handshake (cancel). A terminal error goes to firstErr
// if there is room.
func (c *Conn) readRecords(ctxRead context.Context, cancel context.CancelFunc, firstErr chan error) { //nolint:cyclop
	defer func() {
		if c.isHandshakeCompletedSuccessfully() {
			// Escaping read loop.
			// It's safe to close decrypted channnel now.
			close(c.decrypted)
		}
		c.endRead()

		// Force stop handshaker when the underlying connection is closed.
		cancel()
	}()
	for {
		if err := c.readAndBuffer(ctxRead); err != nil { //nolint:nestif
			var alertErr *alertError
			if errors.As(err, &alertErr) {
				if !alertErr.IsFatalOrCloseNotify() {
					if c.isHandshakeCompletedSuccessfully() {
						c.passReadError(ctxRead, err)
					}

					continue // non-fatal alert must not stop read loop
				}
			} else {
				switch {
				case errors.Is(err, context.DeadlineExceeded),
					errors.Is(err, context.Canceled),
					errors.Is(err, io.EOF),
					errors.Is(err, net.ErrClosed):
				case errors.Is(err, recordlayer.ErrInvalidPacketLength):
					// Decode error must be silently discarded
					// [RFC6347 Section-4.1.2.7]
					continue
				default:
					if c.isHandshakeCompletedSuccessfully() {
						// Keep read loop and pass the read error to Read()
						c.passReadError(ctxRead, err)

						continue // non-fatal alert must not stop read loop
					}
				}
			}

			select {
			case firstErr <- err:
			default:
			}

			if alertErr != nil {
				if alertErr.IsFatalOrCloseNotify() {
					_ = c.close(false) //nolint:contextcheck
				}
			}
			if !c.isConnectionClosed() && errors.Is(err, context.Canceled) {
				c.log.Trace("handshake timeouts - closing underline connection")
				_ = c.close(false) //nolint:contextcheck
			}

			return
		}
	}
}

// handshakeInline is handshake for a server connection of this package's
// listener, on the calling goroutine alone (Bastion patch,
// third_party/README.md): the state machine reads the client's flights
// itself (readHandshake) instead of receiving them from the record
// reader, and the record reader starts once the handshake has finished.
// Pion ran both from the start, with two hand-offs between them per
// datagram and one to the caller at the end. What ends a handshake, and
// what it returns, is what the two goroutines did.
func (c *Conn) handshakeInline(
	ctx context.Context,
	lc *udp.PacketConn,
	cfg *handshakeConfig,
	initialFlight flightVal,
	initialState handshakeState,
) error {
	cfg.parkWhenFinished = true
	c.fsm = newHandshakeFSM(&c.state, c.handshakeCache, cfg, initialFlight)
	c.fsm.reader = c

	// Close cancels the handshake and its reads: the same context.
	ctxHs, cancel := context.WithCancel(ctx)
	defer cancel()
	c.closeLock.Lock()
	c.cancelHandshaker = cancel
	c.cancelHandshakeReader = cancel
	c.closeLock.Unlock()

	c.readsHandshake = true
	err := c.fsm.Run(ctxHs, c, initialState)
	c.readsHandshake = false
	_ = lc.SetReadDeadline(time.Time{})

	if errors.Is(err, errHandshakeParked) {
		c.setHandshakeCompletedSuccessfully()
		ctxRead, cancelRead := context.WithCancel(context.Background())
		c.closeLock.Lock()
		c.cancelHandshakeReader = cancelRead
		closed := c.isConnectionClosed()
		c.closeLock.Unlock()
		if closed {
			cancelRead()
		}
		// The listener's inline reader may take the very first datagram
		// of the established session (SetInlineReadHandler): it needs the
		// record reader's context before that reader has read anything.
		c.procMu.Lock()
		c.readCtx = ctxRead
		c.procMu.Unlock()
		// Bastion patch (22): the record reader starts when it has
		// something to do: a datagram queued for it (lc's queue hook), or
		// Close (close), whichever comes first; now if either came while
		// the hook was not yet set. Bastion patch (20): on a goroutine
		// whose stack a record reader has grown before, if one is spare.
		start := func() { lc.Go(func() { c.readRecords(ctxRead, func() {}, nil) }) }
		c.startReader.Store(&start)
		lc.SetOnQueue(c.startRecordReader)
		c.closeLock.Lock()
		closed = c.isConnectionClosed()
		c.closeLock.Unlock()
		if closed || lc.Queued() {
			c.startRecordReader()
		}

		return nil
	}
	if ctx.Err() != nil {
		err = ctx.Err()
	}
	// The record reader's end: it was cancelled (and then closed the
	// connection) unless a read error of its own ended the handshake.
	c.endRead()
	if !c.handshakeReadFailed && !c.isConnectionClosed() {
		c.log.Trace("handshake timeouts - closing underline connection")
		_ = c.close(false) //nolint:contextcheck
	}

	return c.translateHandshakeCtxError(err)
}

// startRecordReader starts the record reader of a listener's connection
// whose handshake has finished, unless it has started (Bastion patch
// (22)). Until then the connection has no goroutine: application data
// the listener's read loop takes itself (SetInlineReadHandler) needs
// none, and an idle session holds none. Anything else (a retransmitted
// flight, an alert, data for Read or for a read handler that is not
// inline, data while the reader would be busy) is queued by the listener,
// which then calls this; so does Close, after which the reader ends the
// connection's reading as it always did (the read handler's io.EOF, Read's
// end).
func (c *Conn) startRecordReader() {
	if f := c.startReader.Swap(nil); f != nil {
		(*f)()
	}
}

// readHandshake implements handshakeReader for handshakeInline: it reads
// and processes datagrams as the record reader does, until one brings
// handshake messages. The retransmit deadline is the listener
// connection's read deadline. Errors are handled as the record reader
// handled them during a handshake: skipped, or the end of the handshake
// (a fatal alert or close_notify also closes the connection).
func (c *Conn) readHandshake(ctx context.Context, deadline time.Time) (recvHandshakeState, error) {
	if lc, ok := c.nextConn.Conn().(*udp.PacketConn); ok {
		_ = lc.SetReadDeadline(deadline)
	}
	for {
		c.handshakeArrived = false
		err := c.readAndBuffer(ctx)
		if err == nil {
			if c.handshakeArrived {
				c.handshakeArrived = false

				return c.handshakeRecvd, nil
			}

			continue
		}
		if errors.Is(err, dnet.ErrTimeout) {
			return recvHandshakeState{}, errRetransmitDue
		}
		if ctx.Err() != nil {
			return recvHandshakeState{}, ctx.Err()
		}
		var alertErr *alertError
		switch {
		case errors.As(err, &alertErr):
			if !alertErr.IsFatalOrCloseNotify() {
				continue // non-fatal alert must not stop read loop
			}
			_ = c.close(false) //nolint:contextcheck
		case errors.Is(err, recordlayer.ErrInvalidPacketLength):
			// Decode error must be silently discarded
			// [RFC6347 Section-4.1.2.7]
			continue
		}
		c.handshakeReadFailed = true

		return recvHandshakeState{}, err
	}
}

// passReadError gives err to Read, or to the read handler if one is set.
func (c *Conn) passReadError(ctx context.Context, err error) {
	if c.readHandler.Load() != nil {
		c.deliver(nil, err)

		return
	}
	select {
	case c.decrypted <- err:
	case <-c.closed.Done():
	case <-ctx.Done():
	}
	c.drainToHandler()
}

func (c *Conn) translateHandshakeCtxError(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) && c.isHandshakeCompletedSuccessfully() {
		return nil
	}

	return &HandshakeError{Err: err}
}

func (c *Conn) close(byUser bool) error {
	c.closeLock.Lock()
	cancelHandshaker := c.cancelHandshaker
	cancelHandshakeReader := c.cancelHandshakeReader
	closedByUser := c.connectionClosedByUser
	if byUser {
		c.connectionClosedByUser = true
	}
	isClosed := c.isConnectionClosed()
	if !isClosed {
		c.closed.Close()
	}
	c.closeLock.Unlock()

	cancelHandshaker()
	cancelHandshakeReader()
	if !isClosed {
		// Bastion patch: Write's context is the write deadline's, no longer
		// also ended by Close through a goroutine per Write
		// (contextWithClose). A Write blocked in the socket (a peer that
		// stopped reading a pipe) holds the write lock that close_notify
		// needs below, so Close ends it here, by expiring that context.
		// After Close no Write starts (ErrConnClosed).
		// Bastion patch (47): a Write makes the deadline before it looks
		// whether the connection is closed; none means no Write to end.
		if d := c.writeDeadline.Load(); d != nil {
			d.Set(time.Unix(1, 0))
		}
	}
	// Bastion patch (22): a record reader not started yet starts now, to
	// end as a cancelled one does; unless the listener's inline reader is
	// processing a datagram, which then ends reading itself (patch (26)).
	if !c.inlineProc.Load() {
		c.startRecordReader()
	}

	if closedByUser || isClosed {
		return nil
	}

	if c.isHandshakeCompletedSuccessfully() && byUser {
		// Discard error from notify() to return non-error on user Close()
		// even if the underlying connection is already closed.
		_ = c.notify(context.Background(), alert.Warning, alert.CloseNotify)
	}

	return c.nextConn.Close()
}

func (c *Conn) isConnectionClosed() bool {
	// Bastion patch (45): Err, not a select on Done, whose first call
	// makes the closer's channel (an allocation) only to look at it.
	return c.closed.Err() != nil
}

func (c *Conn) setLocalEpoch(epoch uint16) {
	c.state.localEpoch.Store(epoch)
}

func (c *Conn) setRemoteEpoch(epoch uint16) {
	c.state.remoteEpoch.Store(epoch)
}

// LocalAddr implements net.Conn.LocalAddr.
func (c *Conn) LocalAddr() net.Addr {
	return c.nextConn.LocalAddr()
}

// RemoteAddr implements net.Conn.RemoteAddr.
func (c *Conn) RemoteAddr() net.Addr {
	c.lock.RLock()
	defer c.lock.RUnlock()

	return c.rAddr
}

func (c *Conn) sessionKey() []byte {
	if c.state.isClient {
		// As ServerName can be like 0.example.com, it's better to add
		// delimiter character which is not allowed to be in
		// neither address or domain name.
		return []byte(c.rAddr.String() + "_" + c.fsm.cfg.serverName)
	}

	return c.state.SessionID
}

// SetDeadline implements net.Conn.SetDeadline.
func (c *Conn) SetDeadline(t time.Time) error {
	lazyDeadline(&c.readDeadline).Set(t)

	return c.SetWriteDeadline(t)
}

// SetReadDeadline implements net.Conn.SetReadDeadline.
func (c *Conn) SetReadDeadline(t time.Time) error {
	lazyDeadline(&c.readDeadline).Set(t)
	// Read deadline is fully managed by this layer.
	// Don't set read deadline to underlying connection.
	return nil
}

// SetWriteDeadline implements net.Conn.SetWriteDeadline.
func (c *Conn) SetWriteDeadline(t time.Time) error {
	lazyDeadline(&c.writeDeadline).Set(t)
	// Write deadline is also fully managed by this layer.
	return nil
}

// lazyDeadline returns the deadline in p, made (without one set) by the
// first caller (Bastion patch (47)). A deadline made now behaves as the
// one createConn used to make: nothing has set it, so it has not passed.
func lazyDeadline(p *atomic.Pointer[deadline.Deadline]) *deadline.Deadline {
	if d := p.Load(); d != nil {
		return d
	}
	d := deadline.New()
	if p.CompareAndSwap(nil, d) {
		return d
	}

	return p.Load()
}
