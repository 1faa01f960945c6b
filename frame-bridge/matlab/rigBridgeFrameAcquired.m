function varargout = rigBridgeFrameAcquired(src, evt, varargin)
% RIGBRIDGEFRAMEACQUIRED  ScanImage user function: send each acquired frame to rigd.
%
% In ScanImage's User Functions table: event 'frameAcquired', function
% 'rigBridgeFrameAcquired', arguments for example
%   {'port', 7690, 'tokenFile', 'C:\rig\bridge.token', 'channel', 1}
% (also 'host', 'queueFrames', 'layout'). The frame is handed to
% rigbridge_sender, which queues it and sends what the socket takes now: the
% call never waits for the network. A full queue drops the frame and counts
% it; rigd records it as a dropped row in frames.tsv.
%
% From the command line:
%   st = rigBridgeFrameAcquired('stats')   counts so far
%   st = rigBridgeFrameAcquired('close')   send what is queued, close, counts
%
% What it reads from ScanImage (src.hSI.hDisplay.lastStripeData):
% frameNumberAcq (the acquisition's frame number, rigd's frame number) and
% roiData{1}.imageData{channel}{1} (int16; negative values become 0). With
% 'layout' 'lines-as-rows' (default) image(r, c) is pixel c of line r; use
% 'lines-as-columns' if your ScanImage version stores lines as columns.
% Verified: in GNU Octave with a stand-in for this object (frame-bridge
% tests). Not verified: in MATLAB with ScanImage (see docs/frame-bridge.md).

  persistent s
  if ischar(src)
    switch src
      case 'stats'
        if isempty(s)
          varargout{1} = struct();
        else
          varargout{1} = s.stats;
        end
      case 'close'
        if isempty(s)
          varargout{1} = struct();
        else
          s = rigbridge_sender('close', s, 5);
          varargout{1} = s.stats;
          s = [];
        end
      otherwise
        error('rigBridgeFrameAcquired: unknown command ''%s''', src);
    end
    return;
  end

  opts = struct('host', '127.0.0.1', 'port', 7690, 'tokenFile', '', 'channel', 1, ...
                'queueFrames', 16, 'layout', 'lines-as-rows');
  for k = 1:2:numel(varargin)
    opts.(varargin{k}) = varargin{k + 1};
  end

  sd = src.hSI.hDisplay.lastStripeData;
  img = sd.roiData{1}.imageData{opts.channel}{1};
  if strcmp(opts.layout, 'lines-as-rows')
    [height, width] = size(img);
    px = reshape(uint16(img.'), 1, []);   % row-major: line 1 first
  else
    [width, height] = size(img);
    px = reshape(uint16(img), 1, []);
  end

  if isempty(s)
    fid = fopen(opts.tokenFile, 'r');
    if fid < 0
      error('rigBridgeFrameAcquired: cannot read the token file ''%s''', opts.tokenFile);
    end
    token = fread(fid, Inf, 'uint8=>char').';
    fclose(fid);
    token = regexprep(token, '\r?\n$', '');
    s = rigbridge_sender('open', struct('host', opts.host, 'port', opts.port, ...
        'token', token, 'width', width, 'height', height, 'channels', 1, ...
        'queue_frames', opts.queueFrames));
  end

  if isfield(sd, 'frameTimestamp') || isprop_safe(sd, 'frameTimestamp')
    stamp_ns = uint64(round(double(sd.frameTimestamp) * 1e9));
  else
    stamp_ns = uint64(round(time() * 1e9));
  end
  last_error = s.stats.last_error;
  s = rigbridge_sender('send', s, sd.frameNumberAcq, stamp_ns, px);
  if ~isempty(s.stats.last_error) && ~strcmp(s.stats.last_error, last_error)
    warning('rigBridgeFrameAcquired: %s', s.stats.last_error);
  end
end

function tf = isprop_safe(obj, name)
  tf = false;
  try
    tf = isobject(obj) && isprop(obj, name);
  catch
  end
end
