function varargout = rigbridge_sender(action, varargin)
% RIGBRIDGE_SENDER  Send frames to rig-frame-bridge without waiting on the network.
%
%   s = rigbridge_sender('open', opts)        opts: host, port, token, width,
%                                              height, channels, queue_frames
%   s = rigbridge_sender('send', s, frame_number, stamp_ns, pixels)
%   s = rigbridge_sender('pump', s)           move queued bytes, read acks
%   s = rigbridge_sender('close', s, timeout_s)
%   st = rigbridge_sender('stats', s)
%
% The state is a struct passed by value: keep the returned one. 'send'
% queues the frame (dropping it and counting when the queue is full) and
% then sends queued frames while fewer than window_frames (2) are not yet
% acknowledged by the receiver, which acks every frame it writes. Octave's
% sockets send waits when the socket buffer is full, even with
% MSG_DONTWAIT; the window keeps the unacknowledged bytes under what the
% socket buffers hold (a few MB on loopback and LAN), so a stalled or slow
% receiver costs queued and then dropped frames, not a wait. A frame larger
% than the buffers can still make one call wait. A connection is made at
% most every backoff_s; the hello and replies are handled by later calls.
%
% Transport: the GNU Octave 'sockets' package (pkg load sockets; Debian:
% octave-sockets). Verified in Octave 7 by frame-bridge's tests. In MATLAB
% use the Python sender instead (py.rigbridge.FrameSender, see
% docs/frame-bridge.md): MATLAB has no non-blocking TCP send.
%
% Wire format: docs/protocol.md section 4. pixels: width*height*channels
% values, sent row-major (the first row first), as uint16 little-endian.

  switch action
    case 'open'
      varargout{1} = do_open(varargin{1});
    case 'send'
      s = varargin{1};
      s = enqueue(s, varargin{2}, varargin{3}, varargin{4});
      varargout{1} = pump(s);
    case 'pump'
      varargout{1} = pump(varargin{1});
    case 'close'
      varargout{1} = do_close(varargin{:});
    case 'stats'
      s = varargin{1};
      varargout{1} = s.stats;
    otherwise
      error('rigbridge_sender: unknown action ''%s''', action);
  end
end

function s = do_open(opts)
  pkg_load_sockets();
  [~, ~, endian] = computer();
  if endian ~= 'L'
    error('rigbridge_sender: only little-endian hosts are supported');
  end
  d = struct('host', '127.0.0.1', 'port', 7690, 'token', '', 'width', 512, ...
             'height', 512, 'channels', 1, 'queue_frames', 16, 'backoff_s', 1.0, ...
             'stall_timeout_s', 10.0, 'window_frames', 2);
  f = fieldnames(opts);
  for k = 1:numel(f)
    d.(f{k}) = opts.(f{k});
  end
  if numel(d.token) < 16
    error('rigbridge_sender: the token must be at least 16 bytes (the receiver''s token file)');
  end
  s.opts = d;
  s.frame_bytes = d.width * d.height * d.channels * 2;
  s.sock = [];
  s.state = 'down';           % down | hello | up
  s.next_connect_s = 0;
  s.queue = {};
  s.out = uint8([]);          % bytes of the message being sent
  s.out_frame = -1;           % its frame number (-1: not a frame)
  s.out_full = uint8([]);     % the whole message, to send again after a break
  s.inbuf = uint8([]);
  s.last_progress_s = now_s();
  s.stats = struct('queued', 0, 'sent', 0, 'dropped', 0, 'written', 0, ...
                   'connects', 0, 'refusals', 0, 'disconnects', 0, 'last_error', '');
  s.conn_written = 0;
  s.conn_started = 0;         % frames begun on this connection
end

function pkg_load_sockets()
  if exist('OCTAVE_VERSION', 'builtin')
    pkg load sockets
  else
    error(['rigbridge_sender: this transport needs GNU Octave''s sockets package; ' ...
           'in MATLAB use the Python sender (py.rigbridge.FrameSender)']);
  end
end

function t = now_s()
  t = time();
end

function s = enqueue(s, frame_number, stamp_ns, pixels)
  if numel(pixels) ~= s.opts.width * s.opts.height * s.opts.channels
    error('rigbridge_sender: the frame has %d pixels: expected %d', numel(pixels), ...
          s.opts.width * s.opts.height * s.opts.channels);
  end
  if numel(s.queue) >= s.opts.queue_frames
    s.stats.dropped = s.stats.dropped + 1;
    return;
  end
  s.queue{end + 1} = {uint64(frame_number), uint64(stamp_ns), uint16(pixels)};
  s.stats.queued = s.stats.queued + 1;
end

function b = lebytes(x, type)
  % Little-endian bytes of x as `type` (the host byte order is checked once,
  % in 'open': big-endian hosts are refused).
  switch type
    case 'uint32'
      b = typecast(uint32(x), 'uint8');
    otherwise
      b = typecast(uint64(x), 'uint8');
  end
end

function msg = frame_message(s, item)
  % Header: FRAM, payload_len, frame, stamp, flags (0: sender clock), 0, dropped.
  px = item{3};
  payload = typecast(px(:).', 'uint8');
  head = [uint8('FRAM'), lebytes(numel(payload), 'uint32'), lebytes(item{1}, 'uint64'), ...
          lebytes(item{2}, 'uint64'), lebytes(0, 'uint32'), lebytes(0, 'uint32'), ...
          lebytes(s.stats.dropped, 'uint64')];
  msg = [head, payload];
end

function s = drop_connection(s, why)
  if ~isempty(s.sock)
    try
      disconnect(s.sock);
    catch
    end
  end
  s.sock = [];
  if strcmp(s.state, 'up')
    s.stats.disconnects = s.stats.disconnects + 1;
  end
  s.state = 'down';
  s.stats.written = s.stats.written + s.conn_written;
  s.conn_written = 0;
  s.conn_started = 0;
  s.inbuf = uint8([]);
  s.stats.last_error = why;
  s.next_connect_s = now_s() + s.opts.backoff_s;
  % A frame cut off mid-send is sent again whole on the next connection.
  if s.out_frame >= 0
    s.out = s.out_full;
  else
    s.out = uint8([]);
  end
end

function s = try_connect(s)
  if now_s() < s.next_connect_s
    return;
  end
  s.next_connect_s = now_s() + s.opts.backoff_s;
  try
    sock = socket(AF_INET, SOCK_STREAM, 0);
    connect(sock, struct('addr', s.opts.host, 'port', s.opts.port));
  catch err
    s.stats.last_error = ['connect: ' err.message];
    return;
  end
  tok = uint8(s.opts.token);
  hello = [uint8('RIGFRNET'), lebytes(1, 'uint32'), lebytes(s.opts.width, 'uint32'), ...
           lebytes(s.opts.height, 'uint32'), lebytes(s.opts.channels, 'uint32'), lebytes(1, 'uint32'), ...
           lebytes(numel(tok), 'uint32'), tok];
  n = send(sock, hello, MSG_DONTWAIT);
  s.sock = sock;
  if n ~= numel(hello)
    s = drop_connection(s, 'the hello could not be sent');
    return;
  end
  s.state = 'hello';
  s.last_progress_s = now_s();
end

function v = u64(b)
  v = typecast(uint8(b), 'uint64');
end

function s = read_replies(s)
  eof = false;
  while true
    [d, n] = recv(s.sock, 65536, MSG_DONTWAIT);
    if n == 0
      eof = true;
      break;
    elseif n < 0
      break;
    end
    s.inbuf = [s.inbuf, d(1:n)];
  end
  s = parse_replies(s);
  if eof && ~isempty(s.sock)
    s = drop_connection(s, 'the receiver closed the connection');
  end
end

function s = parse_replies(s)
  while numel(s.inbuf) >= 32
    tag = char(s.inbuf(1:4));
    text_len = double(typecast(s.inbuf(5:8), 'uint32'));
    if text_len > 1024
      s = drop_connection(s, 'a reply longer than the protocol allows');
      return;
    end
    if numel(s.inbuf) < 32 + text_len
      break;
    end
    a = u64(s.inbuf(9:16));
    b = u64(s.inbuf(17:24));
    text = char(s.inbuf(33:32 + text_len));
    s.inbuf = s.inbuf(33 + text_len:end);
    switch tag
      case 'ACPT'
        if double(b) ~= s.frame_bytes
          s = drop_connection(s, sprintf('the receiver expects %d-byte frames', double(b)));
          return;
        end
        s.state = 'up';
        s.stats.connects = s.stats.connects + 1;
        s.last_progress_s = now_s();
        % The frame cut off by a broken connection: skip it if it was written.
        if s.out_frame >= 0 && uint64(s.out_frame) < a
          s.out = uint8([]);
          s.out_frame = -1;
        end
      case 'RFSE'
        s.stats.refusals = s.stats.refusals + 1;
        s = drop_connection(s, ['refused: ' text]);
        return;
      case 'ACK_'
        if double(a) > s.conn_written
          s.last_progress_s = now_s();
        end
        s.conn_written = double(a);
      case 'ERR_'
        s = drop_connection(s, ['the receiver closed the connection: ' text]);
        return;
    end
  end
end

function s = pump(s)
  if strcmp(s.state, 'down')
    s = try_connect(s);
  end
  if ~strcmp(s.state, 'down')
    s = read_replies(s);
  end
  if ~strcmp(s.state, 'up')
    return;
  end
  while true
    if isempty(s.out)
      if isempty(s.queue)
        break;
      end
      % Octave's send waits when the socket is full, whatever the flags:
      % begin a frame only while fewer than window_frames are unacknowledged
      % (the receiver acks every frame), so the socket never fills.
      if s.conn_started - s.conn_written >= s.opts.window_frames
        if now_s() - s.last_progress_s > s.opts.stall_timeout_s
          s = drop_connection(s, sprintf('no ack for %g s', s.opts.stall_timeout_s));
        end
        break;
      end
      s.conn_started = s.conn_started + 1;
      item = s.queue{1};
      s.queue(1) = [];
      s.out = frame_message(s, item);
      s.out_full = s.out;
      s.out_frame = double(item{1});
    end
    n = send(s.sock, s.out, MSG_DONTWAIT);
    if n <= 0
      % The socket is full: try again on the next call.
      if now_s() - s.last_progress_s > s.opts.stall_timeout_s
        s = drop_connection(s, sprintf('no progress for %g s', s.opts.stall_timeout_s));
      end
      break;
    end
    s.last_progress_s = now_s();
    s.out = s.out(n + 1:end);
    if isempty(s.out)
      s.stats.sent = s.stats.sent + 1;
      s.out_frame = -1;
    end
  end
end

function s = do_close(s, timeout_s)
  if nargin < 2
    timeout_s = 5;
  end
  deadline = now_s() + timeout_s;
  while (~isempty(s.queue) || ~isempty(s.out)) && now_s() < deadline
    s = pump(s);
    pause(0.005);
  end
  prev_error = s.stats.last_error;
  if strcmp(s.state, 'up')
    bye = [uint8('BYE_'), lebytes(0, 'uint32'), lebytes(0, 'uint64'), lebytes(0, 'uint64'), ...
           lebytes(0, 'uint32'), lebytes(0, 'uint32'), lebytes(s.stats.dropped, 'uint64')];
    send(s.sock, bye, MSG_DONTWAIT);
    t = now_s() + 0.5;
    while now_s() < t && ~isempty(s.sock)
      s = read_replies(s);
      pause(0.01);
    end
  end
  if ~isempty(s.sock)
    s = drop_connection(s, prev_error);
  end
  % The receiver closing after our goodbye is no error.
  s.stats.last_error = prev_error;
end
